"""Atomic writes (`segppo.io`): what appears at the path has the permissions a plain write gives."""

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

from segppo.eval.plots import have_matplotlib, plot_score_distributions
from segppo.io import atomic_folder, atomic_write_json, atomic_write_text


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_follow_the_umask_not_the_temp_files_private_mode(tmp_path):
    """The temporary file or folder is private (0600 / 0700); the result must not be: a teammate or a
    job under another user on a shared cluster has to read results.json, segppo.json and the run's
    folders as they read anything else written there."""
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        with atomic_folder(tmp_path / "run") as folder:
            (folder / "c.txt").write_text("y")
        assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.json") == 0o644
        assert mode(tmp_path / "run") == 0o755
        if have_matplotlib():
            plot_score_distributions(tmp_path / "scores.png", {"gold": {"sft": [0.0, 1.0]}})
            assert mode(tmp_path / "scores.png") == 0o644
        os.umask(0o077)  # a private umask stays private
        atomic_write_text(tmp_path / "d.txt", "x")
        with atomic_folder(tmp_path / "private") as folder:
            pass
        assert mode(tmp_path / "d.txt") == 0o600 and mode(tmp_path / "private") == 0o700
    finally:
        os.umask(old)
    # and an existing file's content is replaced whole
    atomic_write_text(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "new"


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    """A writer that fails halfway (a full disk, a plot that raises) must not leave a half-written
    file at the path, nor a hidden temporary beside it."""
    from segppo.io import atomic_file

    target = tmp_path / "results.json"
    atomic_write_text(target, "old\n")
    try:
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    except OSError:
        pass
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    if have_matplotlib():  # the plot goes through the same write, as a PNG whatever the temporary's name
        png = plot_score_distributions(tmp_path / "scores.png", {"gold": {"sft": [0.0, 1.0]}})
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "scores.png"]


def test_an_atomic_folder_is_synced_before_it_is_renamed_in(tmp_path, monkeypatch):
    """A crash just after the rename must not leave a folder of empty or half-written files at the
    path: every file and folder written is on disk (fsync) before the rename makes it the target's.
    `os.fsync` is the real one, watched: which paths it syncs, and whether the target exists yet."""
    target, synced = tmp_path / "model", []
    real_fsync = os.fsync

    def watched_fsync(fd):
        synced.append((Path(os.readlink(f"/proc/self/fd/{fd}")), target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watched_fsync)
    with atomic_folder(target) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights").write_bytes(b"w" * 10)
    paths = {path.relative_to(tmp) if path != tmp else Path(".") for path, _ in synced}
    assert paths >= {Path("config.json"), Path("sub/weights"), Path("sub"), Path(".")}
    assert not any(existed for _, existed in synced)  # all before the rename
    assert (target / "sub" / "weights").read_bytes() == b"w" * 10


KILLED_WRITER = """
import os, signal, sys
from segppo.io import atomic_folder
with atomic_folder(sys.argv[1]) as tmp:
    (tmp / "weights").write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writers_temporary_is_removed_and_a_live_writers_kept(tmp_path):
    """A writer killed inside `atomic_folder` leaves its hidden temporary; the next write of the same
    target removes it (its writer is dead), never the temporary of a live writer (concurrent writers
    of one target exist: the model cache). The last writer to finish wins."""
    target = tmp_path / "model"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], timeout=60)
    assert killed.returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".model.") and (left / "weights").read_text() == "half"
    with atomic_folder(target) as live:  # a live writer: this process
        (live / "weights").write_text("first")
        with atomic_folder(target) as second:  # a concurrent writer of the same target starts
            assert not left.exists() and live.exists()
            (second / "weights").write_text("second")
        assert live.exists()
    assert (target / "weights").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
