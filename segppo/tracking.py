"""Run tracking: `metrics.jsonl`, the resolved config, a rich live progress bar, optional TensorBoard/W&B.

Only rank 0 writes or draws; on other ranks every method is a no-op, so trainers call them
unconditionally.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from segppo.io import atomic_write_text

console = Console(stderr=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than crash
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item())
    return value


def write_config(config: Any, output_dir: Path, name: str = "config.json") -> Path:
    """Write the resolved config (a dataclass) as JSON into `output_dir`."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    path = Path(output_dir) / name
    atomic_write_text(path, json.dumps({k: _jsonable(v) for k, v in data.items()}, indent=2) + "\n")
    return path


class Tracker:
    """Appends metrics to `output_dir/metrics.jsonl` and mirrors them to TensorBoard/W&B when asked."""

    def __init__(
        self,
        output_dir: Path,
        *,
        enabled: bool = True,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        run_name: str | None = None,
        config: Any = None,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        self._start = time.time()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # tensorboard is optional
                raise RuntimeError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from err
            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise RuntimeError("--wandb-project needs the wandb package: pip install wandb") from err
            cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=cfg)

    def log(self, step: int, metrics: dict[str, Any], *, split: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, "time": round(time.time() - self._start, 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        numbers = {f"{split}/{k}": float(v) for k, v in row.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(output_dir: Path, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of `output_dir/metrics.jsonl`, optionally only one split."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


def _rows_at_last_save(output_dir: Path, name: str) -> int | None:
    """How many rows of `output_dir/name` the latest training state recorded (None: not recorded)."""
    from segppo.state import LATEST, LOG_ROWS

    pointer = Path(output_dir) / "state" / LATEST
    if not pointer.exists():
        return None
    record = Path(output_dir) / "state" / pointer.read_text().strip() / LOG_ROWS
    if not record.exists():
        return None
    return json.loads(record.read_text()).get(name, 0)


def truncate_metrics(output_dir: Path, after_step: int, name: str = "metrics.jsonl") -> None:
    """Keep the rows of `output_dir/name` that the resumed state had seen (a resumed run logs the rest again).

    That is the rows the latest state recorded when it was saved, so a row logged after the save
    at the same step (a final evaluation) or torn by a kill is dropped; for a state that recorded
    none, the complete rows up to `after_step`.
    """
    path = Path(output_dir) / name
    if not path.exists():
        return
    complete = path.read_bytes().split(b"\n")[:-1]  # a last line without its newline was torn
    recorded = _rows_at_last_save(output_dir, name)
    if recorded is not None:
        kept = complete[:recorded]
    else:
        kept = [line for line in complete if line.strip() and json.loads(line)["step"] <= after_step]
    atomic_write_text(path, "".join(line.decode() + "\n" for line in kept))


def quiet_progress_bars() -> None:
    """Turn off the libraries' own progress bars and info logs (for ranks other than 0)."""
    import datasets
    import huggingface_hub.utils
    import transformers

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# Seconds between the one-line progress records a run prints when its console is not a terminal
# (a log file, nohup, CI, a cluster job), where a live bar would show only at the end; the
# SEGPPO_PROGRESS_INTERVAL environment variable sets another interval (0: a record per update).
PROGRESS_INTERVAL = 30.0


def progress_interval() -> float:
    value = os.environ.get("SEGPPO_PROGRESS_INTERVAL")
    if value is None:
        return PROGRESS_INTERVAL
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"SEGPPO_PROGRESS_INTERVAL must be a number of seconds, got {value!r}") from None
    if not seconds >= 0:
        raise ValueError(f"SEGPPO_PROGRESS_INTERVAL must be >= 0 seconds, got {value!r}")
    return seconds


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


def _metric_text(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


class LiveProgress:
    """Progress of a long loop (rank 0 only): a rich bar whose description shows the latest metrics
    on a terminal; elsewhere one line per `progress_interval()` seconds with the same fields (done
    of total, the metrics, tokens/s, elapsed, ETA), from the start to a last line at the end.

    `update(advance, tokens=n, **metrics)`: `tokens` counts the tokens processed since the last
    update, for the tokens/s of the whole loop so far.
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        enabled: bool = True,
        completed: int = 0,
        unit: str = "steps",
        interval: float | None = None,
    ):
        self.enabled = enabled
        self._progress = None
        if not enabled:
            return
        self.description, self.unit = description, unit
        self._as_lines = not console.is_terminal
        self._interval = progress_interval() if interval is None else interval
        self._metrics: dict[str, Any] = {}
        self._tokens = 0.0
        self._start_completed = completed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
            transient=False,
            disable=self._as_lines,
        )
        self._task = self._progress.add_task(description, total=total, completed=completed, metrics="")

    def __enter__(self):
        if self._progress is None:
            return self
        self._progress.start()
        if self._as_lines:
            self._record()
            if self._interval > 0:
                self._thread = threading.Thread(target=self._tick, name="segppo-progress", daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._progress is None:
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._progress.stop()
        if self._as_lines:
            self._record()

    def _tick(self) -> None:
        while not self._stop.wait(self._interval):
            self._record()

    @property
    def _task_state(self):
        return self._progress.tasks[self._task]

    def tokens_per_second(self) -> float | None:
        elapsed = self._task_state.elapsed
        return self._tokens / elapsed if self._tokens and elapsed else None

    def record(self) -> str:
        """The one-line record of where the loop is: the fields the bar shows, as text."""
        task = self._task_state
        total = "?" if task.total is None else f"{task.total:.0f}"
        parts = [f"{self.description}  {task.completed:.0f}/{total} {self.unit}"]
        with self._lock:
            if self._metrics:
                parts.append(_metric_text(self._metrics))
        rate = self.tokens_per_second()
        if rate is not None:
            parts.append(f"tok/s {rate:.4g}")
        parts.append(f"elapsed {_clock(task.elapsed)}  eta {_clock(self._eta())}")
        return "  ".join(parts)

    def _eta(self) -> float | None:
        """Seconds left at this loop's average pace so far (steps of minutes leave rich's own
        estimate, a 30-second window, without samples)."""
        task = self._task_state
        done = task.completed - self._start_completed
        if task.total is None or not done or not task.elapsed:
            return None
        return max(task.total - task.completed, 0) * task.elapsed / done

    def _record(self) -> None:
        console.print(self.record(), markup=False, highlight=False, soft_wrap=True)

    def update(self, advance: int = 1, *, tokens: int | float = 0, **metrics: Any) -> None:
        if self._progress is None:
            return
        self._tokens += float(tokens)
        with self._lock:
            self._metrics.update(metrics)
            shown = dict(self._metrics)
        rate = self.tokens_per_second()
        if rate is not None:
            shown["tok/s"] = rate
        self._progress.update(self._task, advance=advance, metrics=_metric_text(shown))
        if self._as_lines and self._interval == 0:
            self._record()
