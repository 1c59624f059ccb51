"""Atomic writes (`segppo.io`): what appears at the path has the permissions a plain write gives."""

import os
import stat

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
