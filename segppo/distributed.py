"""DeepSpeed set-up: ranks, engines, launching; training states are in `segppo.state`.

One process needs no launcher: `init_distributed` makes a one-rank process group itself.
`--nproc N` spawns N local ranks (`launch`); under an outer `deepspeed`/`torchrun` launcher the
environment already names the rank and world size and segppo simply joins.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessException

from segppo.io import atomic_write_text
from segppo.run_log import route_from_environment
from segppo.state import (  # re-exported (the training-state API was here)
    FREE_SPACE_MARGIN,  # noqa: F401
    LATEST,  # noqa: F401
    LOG_ROWS,  # noqa: F401
    SAVE_TOTAL_LIMIT,  # noqa: F401
    NoSpaceError,
    check_run_folder,  # noqa: F401
    latest_state,  # noqa: F401
    load_training_state,  # noqa: F401
    prune_states,  # noqa: F401
    rng_state,  # noqa: F401
    save_training_state,  # noqa: F401
    set_rng_state,  # noqa: F401
)
from segppo.tracking import quiet_progress_bars

if not torch.cuda.is_available():
    # DeepSpeed probes for accelerators noisily; on a CPU-only machine say it up front.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_launcher() -> bool:
    """True when an outer launcher (or `launch`) already set up this process's rank."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def one_of_several_ranks() -> bool:
    """True in a process that is one rank of several (an outer launcher's or `launch`'s)."""
    return under_launcher() and int(os.environ["WORLD_SIZE"]) > 1


def _quiet_deepspeed() -> None:
    import deepspeed  # noqa: F401  (configures its logger on import)

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-building its `deepspeed_shm_comm` op on CPU.

    DeepSpeed's comm backend builds the op whenever it is created, through torch's extension
    builder: that needs a C++ compiler, and a run killed during the build leaves a lock file
    in the extensions folder on which every later run waits forever. The op only serves
    DeepSpeed's inference all-reduce, which segppo never calls; training collectives go
    through gloo either way. DeepSpeed asks `deepspeed.ops.__compatible_ops__` before it
    builds, and an op marked incompatible there is simply not built.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> DistInfo:
    """Join (or create) the process group and pick this rank's device."""
    import deepspeed

    _quiet_deepspeed()
    own_group = not under_launcher() and not dist.is_initialized()
    if own_group:
        # Only what DeepSpeed's engine reads: RANK/WORLD_SIZE/MASTER_* here would leak into any
        # process started later (a subprocess, a spawned run) and make it join this group's
        # rendezvous as if launched by it (it failed with EADDRINUSE on this process's port).
        os.environ.setdefault("LOCAL_RANK", "0")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cpu":
        _skip_shm_comm_build()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if own_group:
        # One rank needs no rendezvous: an in-process store instead of a TCP port, which another
        # process on a busy machine can take between probing it free and binding it (EADDRINUSE).
        # DeepSpeed adopts a group that is already up.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # An outer launcher's rank variables, or the group above: nothing for DeepSpeed to discover.
    deepspeed.init_distributed(dist_backend=backend, verbose=False, auto_mpi_discovery=False)
    if dist.get_rank() != 0:
        quiet_progress_bars()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


@contextmanager
def rank_group() -> Iterator[DistInfo]:
    """`init_distributed`, then `shutdown` when the block ends: `with rank_group() as info: ...`.

    Whether the block raised decides how this rank leaves, not whatever error the caller may be
    handling around it: a clean end waits for every rank, a failure does not (see `shutdown`).
    """
    info = init_distributed()
    try:
        yield info
    except BaseException:
        shutdown(failed=True)
        raise
    shutdown()


def shutdown(*, failed: bool = False) -> None:
    """Leave a multi-rank process group (gloo aborts at exit otherwise).

    A clean end (`failed=False`) waits in a barrier for every rank, then destroys the group. A rank
    that failed leaves at once: the others may be waiting for it in a collective it will never
    join, and a barrier here would block it (and them) until gloo's half-hour timeout instead of
    letting its error stop the run (`launch`, or an outer launcher, ends the other ranks).

    A one-rank group stays up: DeepSpeed caches its groups, so a second run in the same process
    (a notebook, a test, the demo's stages) reuses the group rather than a destroyed one.
    """
    if failed or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    dist.barrier()
    dist.destroy_process_group()


class RankFailed(RuntimeError):
    """A spawned rank raised; the message names the rank and its error in one line."""


# Errors a spawned rank's failure is re-raised as (its own type when it is one of these or a
# subclass, with the rank in the message), so that callers and the CLI treat an error from a spawned
# rank like the same error from a single process. Any other error becomes a `RankFailed`.
_RERAISED = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    KeyError,
    FloatingPointError,
    NoSpaceError,
)


def _error_class(err: BaseException) -> str:
    return f"{type(err).__module__}:{type(err).__qualname__}"


def _reraised_error(record: dict, message: str) -> BaseException:
    """The parent's error for a rank's error `record`: its own type where `_RERAISED` allows."""
    module, _, name = record["class"].partition(":")
    try:
        error_type = getattr(importlib.import_module(module), name)
        if isinstance(error_type, type) and issubclass(error_type, _RERAISED):
            return error_type(message)
    except (ImportError, AttributeError, TypeError):  # not importable here, or not made from a message
        pass
    return RankFailed(
        f"rank {record['rank']}: {record['type']}: {record['message']} (traceback in {record['log']})"
    )


def _error_record(log_dir: Path, rank: int) -> Path:
    return log_dir / f".rank{rank}.error.json"


def _spawned_worker(
    local_rank: int,
    world_size: int,
    port: int,
    fn: Callable,
    args: tuple,
    log_dir: str,
    record_dir: str,
    quiet_libraries: bool,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    if quiet_libraries:  # as the launching process was (the CLI turns their bars off); rank 0 too
        quiet_progress_bars()
    route_from_environment()  # the libraries' warnings to the run's log, as in the launching process
    if not torch.cuda.is_available():
        # Ranks share the CPU: more threads than cores make every op wait on descheduled threads.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        fn(*args)
    except BaseException as err:
        # The full traceback goes to the run folder; the parent reads the one-line record and
        # reports the rank that failed first (the others may fail after it, on a broken group).
        log = Path(log_dir) / f"rank{local_rank}.error.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"rank {local_rank} of {world_size} failed:\n{traceback.format_exc()}")
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        record = {"rank": local_rank, "time": time.time(), "type": type(err).__name__, "message": message}
        record["class"] = _error_class(err)
        record["log"] = str(log)
        atomic_write_text(_error_record(Path(record_dir), local_rank), json.dumps(record))
        raise
    exit_without_teardown()


def exit_without_teardown() -> None:
    """End a rank whose work is done and saved (spawned by `launch`, or a command under an outer
    launcher's ranks), skipping Python's teardown.

    The teardown is where a finished rank could still die: DeepSpeed keeps its process groups
    (`deepspeed.utils.groups`, and ZeRO-3 parameters in reference cycles) past `shutdown()`, so
    gloo's threads lived into the interpreter's finalization, and destroying them there aborted the
    rank now and then ("terminate called without an active exception", SIGABRT): a run that had
    finished was reported as failed. The logs are flushed first; nothing else is left to do.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _libraries_quiet() -> bool:
    import transformers

    return not transformers.utils.logging.is_progress_bar_enabled()


def launch(fn: Callable, *args: Any, nproc: int = 1, log_dir: Path | None = None) -> None:
    """Run `fn(*args)` on `nproc` local ranks; in-process when `nproc == 1` or under a launcher.

    When a spawned rank fails, every rank is stopped and the error is raised here as one line
    naming the rank (its type kept for user errors); the rank's full traceback is written to
    `log_dir/rankN.error.log` (a temporary folder when `log_dir` is None).
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if nproc == 1 or under_launcher():
        fn(*args)
        return
    if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise ValueError(
            f"--nproc {nproc} asks for more ranks than the {torch.cuda.device_count()} GPUs here"
        )
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="segppo-ranks-"))
    with tempfile.TemporaryDirectory(prefix="segppo-errors-") as record_dir:
        # torch logs a warning per rank it stops after a failure; the error below says it all.
        logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
        try:
            context = torch.multiprocessing.start_processes(
                _spawned_worker,
                args=(nproc, _free_port(), fn, args, str(log_dir), record_dir, _libraries_quiet()),
                nprocs=nproc,
                start_method="spawn",
                join=False,
            )
            # A short grace period: ranks left waiting in a collective on a failed rank never finish.
            while not context.join(grace_period=5):
                pass
        except ProcessException as err:
            records = [json.loads(p.read_text()) for p in Path(record_dir).glob(".rank*.error.json")]
            if not records:  # a rank died without raising (killed, out of memory, a crash)
                raise RankFailed(f"rank {err.error_index} ended without an error message: {err}") from None
            first = min(records, key=lambda r: r["time"])
            message = f"rank {first['rank']}: {first['message']} (traceback in {first['log']})"
            raise _reraised_error(first, message) from None


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def deepspeed_config(
    *,
    micro_batch_size: int,
    grad_accum: int,
    zero_stage: int,
    bf16: bool,
    grad_clip: float | None,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict[str, Any]:
    """A DeepSpeed config for a trained model; the optimizer and scheduler are passed in as objects.

    `offload_optimizer`: optimizer states and fp32 master weights in CPU memory (ZeRO 1-3);
    `offload_params`: ZeRO-3 partitions in CPU memory, fetched to the device for each use."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero-stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
    if offload_params and zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    zero: dict[str, Any] = {"stage": zero_stage}
    pin = torch.cuda.is_available()  # page-locked host memory speeds up the copies to a GPU
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if grad_clip:
        config["gradient_clipping"] = grad_clip
    if offload_optimizer:
        # segppo's own AdamW (a torch optimizer) steps the offloaded states; DeepSpeedCPUAdam would
        # be faster but is a compiled op that not every install has.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def loading_config(*, zero_stage: int, bf16: bool, offload: bool = False) -> dict[str, Any]:
    """The DeepSpeed config a model is built with (`segppo.models.zero3`: partitioned under ZeRO-3,
    an offloaded model's partitions on CPU from the start); also a frozen model's engine config."""
    return deepspeed_config(
        micro_batch_size=1,
        grad_accum=1,
        zero_stage=zero_stage,
        bf16=bf16,
        grad_clip=None,
        offload_params=offload,
    )


def frozen_on_device(model: torch.nn.Module, info: DistInfo, *, zero_stage: int, bf16: bool, offload=False):
    """Put a frozen model (segmenter, reference, reward) on the device; ZeRO-3 partitions it
    (with `offload`, its partitions stay in CPU memory between uses)."""
    model.requires_grad_(False)
    model.eval()
    if zero_stage != 3:
        return model.to(info.device)
    import deepspeed

    config = loading_config(zero_stage=3, bf16=bf16, offload=offload)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 (gathered under ZeRO-3), None on other ranks."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if dist.get_rank() == 0 else None
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
