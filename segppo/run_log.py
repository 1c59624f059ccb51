"""The run's log file: where the warnings of the libraries segppo drives go instead of the screen.

segppo's own warnings (a normalizer whose std reaches its floor, a fit too poor to use) ask the
user to act, so they stay on the screen. A library's notices about its own code (peft reading
transformers' deprecated `is_gradient_checkpointing`, a torch deprecation inside DeepSpeed) are
nothing a user of segppo can act on; the CLI writes them to the run folder's `run.log` and says
at the end how many there were. A warning is segppo's when its category is defined in segppo or
it is raised from a file of segppo (the `segppo`, `segppo.cli` and `segppo.kernels` packages).

Spawned ranks inherit the log through `SEGPPO_RUN_LOG` (see `route_from_environment`).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOG_NAME = "run.log"
ENV = "SEGPPO_RUN_LOG"


@functools.cache
def _own_folders() -> tuple[Path, ...]:
    import segppo
    import segppo.cli
    import segppo.kernels

    paths = [*segppo.__path__, *segppo.cli.__path__, *segppo.kernels.__path__]
    return tuple(Path(p).resolve() for p in paths)


def is_segppo_warning(category: type[Warning], filename: str) -> bool:
    if category.__module__.split(".")[0] == "segppo":
        return True
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):  # "<string>" and the like
        return False
    return any(path.is_relative_to(folder) for folder in _own_folders())


class WarningRouter:
    """A `warnings.showwarning` that writes segppo's warnings to stderr and the others to `log`."""

    def __init__(self, log: Path):
        self.log = Path(log)
        self.count = 0

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if is_segppo_warning(category, filename):
            # One line, as segppo's errors: the source line that warned means nothing to a user.
            (file or sys.stderr).write(f"{category.__name__}: {message}\n")
            return
        text = warnings.formatwarning(message, category, filename, lineno, line)
        self.count += 1
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as f:  # one write per warning: ranks append to the same file
            f.write(f"[pid {os.getpid()}] {text}")


@contextmanager
def library_warnings_to(log: Path | None) -> Iterator[WarningRouter | None]:
    """Within the block, warnings from outside segppo go to `log` (see the module doc); with
    `log=None` nothing changes. Spawned ranks started inside the block do the same."""
    if log is None:
        yield None
        return
    router = WarningRouter(log)
    previous = os.environ.get(ENV)
    os.environ[ENV] = str(log)
    try:
        with warnings.catch_warnings():  # restores showwarning and the filters afterwards
            warnings.showwarning = router.show
            yield router
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous


def route_from_environment() -> None:
    """In a spawned rank: route warnings as the launching process did (`SEGPPO_RUN_LOG`)."""
    log = os.environ.get(ENV)
    if log:
        warnings.showwarning = WarningRouter(Path(log)).show
