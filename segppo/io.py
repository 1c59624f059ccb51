"""Atomic writes: a file or a folder either appears whole at its path or not at all.

Files go to a temporary sibling and are renamed over the target. Folders are built in a temporary
sibling; the old folder, if any, is moved aside, the new one renamed in, and only then is the old
one deleted, so a failure at any point leaves the previous version in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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
    """Yield a temporary folder; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's folder is private; the result is an ordinary one
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, path)


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
