"""ZeRO-3 loading: build models already partitioned across ranks, never one full copy per rank.

Without this, every rank calls `from_pretrained` on the full model and DeepSpeed partitions it only
in `deepspeed.initialize`, so at load each rank briefly holds whole copies of all four PPO models.
With `HfDeepSpeedConfig` alive (transformers keeps only a weak reference to it, so the caller must
hold it: `partitioned_loading`), transformers' `from_pretrained` constructs the model under
`deepspeed.zero.Init`, every parameter partitioned as it is created; but it has every rank read the
whole checkpoint, so each rank's peak host memory is no lower than a full load (measured 1.56-1.9x of
it on 2 CPU ranks). `from_pretrained_partitioned` builds the model the same way and then has
each rank read only its own slice of each weight straight into its partition: no rank gathers a
weight or reads more than 1/N of the checkpoint (a multi-node run needs the checkpoint on a
filesystem every node sees). `deepspeed.initialize` then finds the parameters already partitioned.

The config must stay registered for as long as the models are used, not only while they load:
transformers asks `is_deepspeed_zero3_enabled()` again later (e.g. `generate` then keeps all ranks
stepping together, `resize_token_embeddings` gathers). So the training loop holds the context open
for the whole run.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def is_zero3(ds_config: dict[str, Any] | None) -> bool:
    """Whether a model with this engine config (None: no engine) is built partitioned."""
    return ds_config is not None and zero_stage(ds_config) == 3


@contextlib.contextmanager
def partitioned_loading(ds_config: dict[str, Any]) -> Iterator[object | None]:
    """While open, `from_pretrained` (and `from_config`) build models partitioned under ZeRO-3.

    A no-op for stages 0-2. The process group must already be initialised (`init_distributed`)."""
    if zero_stage(ds_config) != 3:
        yield None
        return
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_deepspeed

    # Nested (`from_pretrained_partitioned` inside the run's own context): this block's config
    # (a frozen model's, with its parameter offload) is the one models are built with, and
    # leaving the block registers the outer one again.
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    outer = ref() if ref is not None else None
    if not dist.is_initialized():
        raise RuntimeError(
            "ZeRO-3 loading needs the process group first (segppo.distributed.init_distributed)"
        )
    registered = HfDeepSpeedConfig(ds_config)  # the reference transformers' weakref points to
    try:
        yield registered
    finally:
        if outer is not None:
            hf_deepspeed.set_hf_deepspeed_config(outer)
        else:
            hf_deepspeed.unset_hf_deepspeed_config()
        del registered


def keep_partitioned_loading(ds_config: dict[str, Any]) -> object | None:
    """Register `ds_config` with transformers for as long as the caller holds the returned object
    (transformers keeps only a weak reference to it), e.g. a training run's models: `generate` and
    friends then know the models are ZeRO-3 partitions. None (nothing registered) below stage 3."""
    if not is_zero3(ds_config):
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


@contextlib.contextmanager
def gathered_for_edit(params) -> Iterator[None]:
    """While open, ZeRO-3 partitions of `params` are whole on every rank; what rank 0 writes into
    them is partitioned again on leaving. A no-op for parameters that are not partitioned."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


def is_partitioned(model: torch.nn.Module) -> bool:
    """True when the model's parameters are ZeRO-3 partitions (DeepSpeed marks them with `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def local_numel(model: torch.nn.Module) -> int:
    """Elements this rank holds: its partitions under ZeRO-3, everything otherwise."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Weight name -> the safetensors file that holds it (single file or a sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: ZeRO-3 loading reads safetensors weights; none found")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def from_pretrained_partitioned(
    model_class,
    folder: str | os.PathLike,
    ds_config: dict[str, Any],
    *,
    config=None,
    dtype: torch.dtype = torch.float32,
    missing_ok: tuple[str, ...] = (),
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """`model_class.from_pretrained(folder)` built partitioned, each rank reading only its slices
    of the checkpoint into its partitions (`_fill_partition`): no rank holds more than its
    partitions plus the one weight zero.Init creates whole before partitioning it. (transformers'
    own ZeRO-3 path has every rank read the whole checkpoint, so a rank peaks at a full copy again;
    see tests/test_zero3_loading.py.)

    `missing_ok` names weights the checkpoint may lack (a new reward head), left as initialised.
    Call inside `partitioned_loading` with the process group up.
    """
    from transformers import AutoConfig

    if zero_stage(ds_config) != 3:
        raise ValueError("from_pretrained_partitioned is for ZeRO stage 3")
    folder = Path(folder)
    if config is None:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    _return_freed_host_memory()
    # The random initial weights are all replaced below; drawing them must not move the run's RNG,
    # or a partitioned run would draw everything after (a new head, dropout, sampling) differently.
    with partitioned_loading(ds_config), torch.random.fork_rng(devices=[]):
        model = model_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    files = _checkpoint_files(folder)
    tied = {n for n in _tied_names(model)}
    absent = [
        n for n, _ in model.named_parameters() if n not in files and n not in tied and n not in missing_ok
    ]
    if absent:
        raise ValueError(f"{folder}: the checkpoint lacks {absent[:8]}")
    headers = {path: _safetensors_header(path) for path in set(files.values())}
    for name, param in model.named_parameters():
        if name in files:
            _fill_partition(param, files[name], headers[files[name]], name, folder)
    return model


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def _fill_partition(param, path: Path, header: tuple[int, dict], name: str, folder: Path) -> None:
    """Read this rank's slice of checkpoint tensor `name` into its ZeRO-3 partition (`ds_tensor`:
    elements `[rank · size, (rank + 1) · size)` of the flattened weight, the last one padded), in
    place when the dtypes agree. No rank gathers the weight or reads more than its own slice."""
    import torch.distributed as dist

    base, entries = header
    entry = entries[name]
    if tuple(entry["shape"]) != tuple(param.ds_shape):
        raise ValueError(
            f"{folder}: {name} has shape {tuple(entry['shape'])}, expected {tuple(param.ds_shape)}"
        )
    file_dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
    if file_dtype is None:
        raise ValueError(f"{path}: {name} has dtype {entry['dtype']}, which ZeRO-3 loading does not read")
    part = param.ds_tensor.data.view(-1)
    size = part.numel()
    start = size * dist.get_rank(group=getattr(param, "ds_process_group", None))
    count = max(0, min(size, param.ds_numel - start))
    if not count:
        return
    itemsize = torch.empty(0, dtype=file_dtype).element_size()
    with open(path, "rb", buffering=0) as f:
        f.seek(base + entry["data_offsets"][0] + start * itemsize)
        if file_dtype == part.dtype and part.device.type == "cpu":
            _read_exactly(f, memoryview(part[:count].view(torch.uint8).numpy()))
            return
        buffer = bytearray(count * itemsize)
        _read_exactly(f, memoryview(buffer))
    with torch.no_grad():
        part[:count].copy_(torch.frombuffer(buffer, dtype=file_dtype))


def _read_exactly(f, view: memoryview) -> None:
    """Fill `view` from `f`: one read returns at most ~2 GiB on Linux, less than a large weight."""
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(f"{f.name}: the file ends inside a tensor")
        done += got


def _return_freed_host_memory() -> None:
    """zero.Init creates each weight whole, then keeps only this rank's slice. glibc raises its mmap
    threshold after such frees, so later whole weights come from the heap and their freed memory
    stays resident: on CPU a rank's RSS then climbs towards a full copy anyway. Pinning the
    threshold (M_MMAP_THRESHOLD = -3, glibc's default 128 KiB) returns every large freed block."""
    if torch.cuda.is_available():
        return  # the weights are created on the GPU; host memory is not where they live
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _tied_names(model: torch.nn.Module) -> list[str]:
    """Parameters another name already covers (e.g. an LM head tied to the input embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return []
    output = model.get_output_embeddings()
    if output is None:
        return []
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is output.weight]
