"""Atomic writes: a file or a folder either appears whole at its path or not at all.

Files go to a temporary sibling and are renamed over the target. Folders are built in a temporary
sibling; the old folder, if any, is moved aside, the new one renamed in, and only then is the old
one deleted, so a failure at any point leaves the previous version in place. Both are synced to
disk before the rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (`os.umask` can only set
    it: setting and restoring would leave other threads a moment under another mask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write by name (text, or a writer such as matplotlib's
    that takes a path); on success it is synced and renamed over `path`, on failure removed. The
    result is an ordinary file, 0666 less the umask, not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it is synced and replaces `path`, on failure it is removed.

    The temporary, `.NAME.<pid>@<host>.<random>.tmp`, names its writer: one killed before it could
    remove it leaves it behind, and a later `atomic_folder(path)` removes it (`_remove_dead_writers`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers(path)
    writer = f"{os.getpid()}@{_host()}"
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{writer}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's folder is private; the result is an ordinary one
        yield tmp
        _sync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, path)


def _host() -> str:
    """This machine as a temporary's name holds it (letters, digits, '-'): a pid says nothing of a
    process on another machine, and a folder on a shared file system has writers on several."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())


def _remove_dead_writers(path: Path) -> None:
    """Remove the temporaries of `path` whose writer, a process of this host, is gone (killed inside
    `atomic_folder`). A live writer's stays: several processes may write one target at once (the
    model cache of `segppo.demo.smollm2`); so does another host's, and one of an older segppo (no pid)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)@([A-Za-z0-9-]+)\.[^.]+\.tmp")
    for entry in path.parent.iterdir():
        found = pattern.fullmatch(entry.name)
        if found and found[2] == _host() and not _alive(int(found[1])):
            shutil.rmtree(entry, ignore_errors=True)  # ignore: another writer may be removing it too


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


def _sync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder (their entries) bottom-up, so that after the
    rename a crash cannot leave the target with empty or half-written files. The cost is the
    write-back of what was just written, which any crash-safe write pays; nothing is read."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            if os.path.islink(os.path.join(root, name)):
                continue  # a link holds no data written here (and may point nowhere)
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_folder(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, replacing an existing `dst` without a moment where neither exists whole."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_folder(path: str | os.PathLike, flag: str = "--output") -> None:
    """An output folder that exists as a file is an error naming the option, said before any work
    (not "[Errno 17] File exists" from the first write into it)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise NotADirectoryError(f"{flag} {path}: a file, not a folder")


def as_recorded(name_or_path: str) -> str:
    """A local path as an absolute path (the record outlives the working directory); a hub name as is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def same_source(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether two model or dataset names denote the same thing: equal names, or the same local path."""
    if a is None or b is None:
        return False
    if str(a) == str(b):
        return True
    return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()
