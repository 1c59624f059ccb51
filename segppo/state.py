"""Training states on disk: atomic saves, retention, the free-space check, resume.

A state is one folder per save under `<run>/state/` (every engine's DeepSpeed checkpoint, each
rank's RNG, the rows of the run's logs at the save), named by a pointer file `latest`.
`segppo.distributed` re-exports these names.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from segppo.io import atomic_write_text, check_output_folder, replace_folder, same_source


class NoSpaceError(OSError):
    """The disk cannot hold another training state; nothing was written, the previous state is intact."""


def rng_state() -> dict[str, Any]:
    """This process's RNG states in plain types, loadable with `torch.load(weights_only=True)`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


LATEST = "latest"

# States kept by default (`--save-total-limit`): the newest and one before it. Saves are atomic,
# so one would do; a second costs one more state's disk and covers a state that is bad for
# reasons a save cannot see (a run that diverged just before it).
SAVE_TOTAL_LIMIT = 2

# Free space asked for beyond the estimated size of a state.
FREE_SPACE_MARGIN = 1.1

# Written into each state: how many complete rows each of the run folder's .jsonl logs had at the
# save, so that a resume keeps exactly those rows (see `tracking.truncate_metrics`).
LOG_ROWS = "log_rows.json"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _state_bytes_estimate(engines: dict[str, Any]) -> int:
    """About what `save_checkpoint` writes: fp32 weights and two Adam moments (and bf16 weights)."""
    total = 0
    for engine in engines.values():
        for p in engine.module.parameters():
            numel = getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions hide the full size
            total += numel * (4 * 3 + p.element_size())
    return total


def _check_free_space(engines: dict[str, Any], state_dir: Path) -> None:
    """Fail on every rank, before anything is written, when the disk cannot hold another state."""
    previous = latest_state(state_dir)
    need = max(_state_bytes_estimate(engines), _folder_bytes(previous) if previous else 0)
    need = int(need * FREE_SPACE_MARGIN)
    free = shutil.disk_usage(state_dir).free
    short = torch.tensor([float(free < need)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    if dist.get_world_size() > 1:
        dist.all_reduce(short, op=dist.ReduceOp.SUM)
    if short.item() > 0:
        kept = f"the previous state {previous} is intact" if previous else "no state was saved yet"
        where = f"{state_dir}: {free / 1e9:.2f} GB free" if free < need else f"{state_dir} on another rank"
        raise NoSpaceError(
            f"not enough free space to save the training state in {where}, about {need / 1e9:.2f} GB "
            f"needed; {kept}. Free some space (or lower --save-total-limit) and --resume"
        )


def _record_log_rows(run_dir: Path, folder: Path) -> None:
    rows = {p.name: p.read_bytes().count(b"\n") for p in sorted(run_dir.glob("*.jsonl"))}
    atomic_write_text(folder / LOG_ROWS, json.dumps(rows) + "\n")


def _step_of(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1]) if folder.name.rsplit("-", 1)[-1].isdigit() else -1


def prune_states(state_dir: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` states (by step; the one `latest` names always stays)."""
    if not keep:
        return
    latest = latest_state(state_dir)
    states = sorted(
        (
            p
            for p in Path(state_dir).iterdir()
            if p.is_dir() and not p.name.startswith(".") and _step_of(p) >= 0
        ),
        key=_step_of,
    )
    for folder in states[:-keep]:
        if latest is None or folder.resolve() != latest.resolve():
            shutil.rmtree(folder, ignore_errors=True)


def save_training_state(
    engines: dict[str, Any],
    state_dir: Path,
    tag: str,
    client_state: dict,
    *,
    keep: int | None = SAVE_TOTAL_LIMIT,
) -> Path:
    """Save every engine's full training state under `state_dir/tag`, atomically; keep the newest `keep`.

    Each engine writes into `state_dir/.tag.tmp/<name>/`; rank 0 then renames the folder to
    `state_dir/tag` and points `state_dir/latest` at it, so an interrupted save leaves the
    previous state and pointer intact. A disk without room for the state fails first, on every
    rank, with nothing written. The state records the rows of the run folder's logs (the
    parent of `state_dir`), so a resume drops any row logged after it.
    """
    state_dir = Path(state_dir)
    tmp = state_dir / f".{tag}.tmp"
    if dist.get_rank() == 0:
        state_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    dist.barrier()
    _check_free_space(engines, state_dir)
    for name, engine in engines.items():
        engine.save_checkpoint(str(tmp / name), tag="state", client_state=client_state, save_latest=False)
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        _record_log_rows(state_dir.parent, tmp)
        replace_folder(tmp, state_dir / tag)
        atomic_write_text(state_dir / LATEST, tag + "\n")
        prune_states(state_dir, keep)
    dist.barrier()
    return state_dir / tag


def check_run_folder(output_dir: Path, *, resume: bool) -> None:
    """A new run needs a fresh folder; `--resume` needs a saved state. Nothing saved is overwritten."""
    check_output_folder(output_dir)
    if resume:
        if latest_state(output_dir / "state") is None:
            raise FileNotFoundError(f"--resume: no training state in {output_dir / 'state'} to resume from")
        return
    if (output_dir / "state").exists() or (output_dir / "metrics.jsonl").exists():
        raise FileExistsError(
            f"{output_dir} already holds a run; pass --resume to continue it or choose another --output"
        )


def _as_started(value: Any) -> Any:
    """An option's value as a resume compares it: an empty mapping is none (`--chat-template-kwargs
    '{}'` renders with no variables, as leaving the option out does). Only here: where an option falls
    back to a recorded value (PPO's and eval's template variables), `{}` is a choice of its own."""
    return None if isinstance(value, dict) and not value else value


def check_resumed_options(
    cfg: Any,
    names: tuple[str, ...] = (),
    changed_since: Any = None,
    same: dict[str, Callable[[str, str], bool]] | None = None,
) -> None:
    """`--resume` goes on from the saved step with the run's own rows and models, as its
    `run_config.json` records them (a resume rewrites it only after loading the state):
    - an option of `names` (a trainer's rows, their order, its segmentation) given another value than
      the run's is an error (paths compare as the files they name, or as `same[name](was, now)`
      says where given: a model option as the model its folder holds, so that a copy resumes; an
      empty mapping as none);
    - so is another LoRA rank or targets, or what `changed_since(started) -> [flag value, ...]` names
      (PPO's critic): a state holds the models its run built, and a resume builds its models from its
      own options and loads the state into them, which DeepSpeed fails deep inside the load."""
    recorded_file = Path(cfg.output_dir) / "run_config.json"
    if not cfg.resume or not recorded_file.is_file():
        return
    started = json.loads(recorded_file.read_text())
    compare = {name: same_source for name in names} | (same or {})
    for name in names:
        if name not in started:
            continue
        was, now = _as_started(started[name]), _as_started(getattr(cfg, name))
        if was == now or (isinstance(was, str) and isinstance(now, str) and compare[name](was, now)):
            continue
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"--resume with {flag} {now}, but the run was started with {was}")
    rank, changed = started.get("lora_rank", 0), []
    if rank != cfg.lora_rank:
        changed.append(f"--lora-rank {rank}")
    elif rank and started.get("lora_targets") != cfg.lora_targets:
        changed.append(f"--lora-targets {started.get('lora_targets')}")
    changed += changed_since(started) if changed_since is not None else []
    if changed:
        raise ValueError(
            f"--resume: the run in {cfg.output_dir} was started with {', '.join(changed)}; its state "
            "holds the models those options build, so resume with the same"
        )


def latest_state(state_dir: Path) -> Path | None:
    pointer = Path(state_dir) / LATEST
    if not pointer.exists():
        return None
    folder = Path(state_dir) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def zero_partitioned(folder: Path | None) -> bool:
    """Whether a state (`save_training_state`'s folder) holds ZeRO's partitioned optimizer files
    (`zero_pp_rank_*`, `bf16_zero_pp_rank_*` in bf16)."""
    return folder is not None and any(Path(folder).glob("*/state/*zero_pp_rank_*_optim_states.pt"))


def _check_zero_layout(name: str, engine: Any, folder: Path) -> None:
    """A ZeRO-partitioned state loaded into an engine without ZeRO fails inside DeepSpeed with an
    AttributeError; say why. (A change in the number of ranks is `load_training_state`'s check.)"""
    saved = any((Path(folder) / name / "state").glob("*zero_pp_rank_*_optim_states.pt"))
    if not saved or engine.zero_optimization():
        return
    recorded = Path(folder).parent.parent / "run_config.json"  # the run folder's (state/<step>/)
    stage = json.loads(recorded.read_text()).get("zero_stage") if recorded.is_file() else None
    hint = f"--zero-stage {stage}, as the run was started" if stage is not None else "the run's --zero-stage"
    raise ValueError(
        f"the training state {folder} was saved under ZeRO (a partitioned optimizer) but this run's "
        f"{name} engine is not partitioned; resume with {hint}"
    )


def load_training_state(engines: dict[str, Any], folder: Path) -> dict:
    """Restore every engine from `folder` (written by `save_training_state`); returns the client state."""
    client_state: dict = {}
    for name, engine in engines.items():
        _check_zero_layout(name, engine, Path(folder))
        path, client_state = engine.load_checkpoint(
            str(Path(folder) / name), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint for {name!r} in {folder}")
    rng_file = Path(folder) / "rng" / f"rank{dist.get_rank()}.pt"
    if not rng_file.exists():
        raise FileNotFoundError(
            f"{rng_file} is missing: the state was saved with a different number of ranks"
        )
    set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state
