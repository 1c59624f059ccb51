"""A batch's common prompt prefix, run once: the forward pass behind every per-row model call.

Chat prompts often open with the same tokens: a template's default system turn, a task's fixed
instructions. In segppo's layout (`segppo.data`: left-padded prompts, so row `i`'s first real token
sits at its own column `s_i`) the rows of a batch then share their first `c` real tokens. Running
those once, as a batch of one whose keys and values every row reads as a cache, and then only the
rest of each row computes the same outputs with `(B - 1)·c` fewer tokens; in the backward the rows'
gradients of that cache sum into the one prefix pass.

    rows [B, L]  ──►  prefix [1, c] (positions 0..c-1)  ──its cache, once per row──►  rest [B, L - c]

Row `i`'s rest is its columns `0..s_i` (padding) and `s_i + c .. L`: the prefix's columns drop out
and everything after them keeps its column minus `c`, so the last `keep` columns (`logits_to_keep`,
the response's) are the rest's last `keep` columns. A call that wants every column (the scalar
heads of the reward model and the critic) gets the prefix's outputs put back at each row's prefix
columns: the result has the shape and, to float32 rounding, the values of the whole-row forward
(tests/test_shared_prefix.py).

On SmolLM2-135M-Instruct, a training micro-batch of 4 prompts sharing 30 of ~40 prompt tokens
(31 % of its columns) ran forward + backward 14.5 % faster (benchmarks/RESULTS.md, issue 22). It is
used only where it is exact and where it pays (`prefix_to_share`): a model type whose attention
reads a plain `DynamicCache` over full attention, sdpa or eager attention, no gradient checkpointing
(transformers drops a passed cache in checkpointed layers), no ZeRO-3 (two passes would gather the
weights twice), no sliding window shorter than the rows, and at least `MIN_SHARED_COLUMNS` of the
batch's columns saved.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

# Model types whose decoder layers read a `DynamicCache` of full-attention keys and values, with
# rotary positions taken from `position_ids` (read in transformers' modeling files). Others run
# every row whole.
SHARED_PREFIX_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "olmo2", "phi3", "smollm3"}
)
# Share only when the rows' common prefix saves at least this fraction of the batch's columns
# `B·L`. The prefix's own pass is a batch of one (small, less efficient matrix products) and the
# rest still attends to it: on CPU, 31 % of the columns saved bought 14.5 % of the time
# (benchmarks/RESULTS.md, issue 22). Below a fifth the saving was not measured to pay.
MIN_SHARED_COLUMNS = 0.2


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model behind a DeepSpeed engine and a peft wrapper."""
    module = getattr(model, "module", model)
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def cache_argument(model: torch.nn.Module) -> str | None:
    """The forward's keyword for a cache (`cache` from transformers 5.25, `past_key_values`
    before), or None when it takes neither."""
    parameters = inspect.signature(_inner(model).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def can_share_prefix(model: torch.nn.Module, width: int) -> bool:
    """Whether `model`'s forward over rows of `width` columns may run a shared prefix as a cache
    and give the whole-row outputs (see the module docstring)."""
    inner = _inner(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "model_type", None) not in SHARED_PREFIX_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    checkpointing = getattr(inner, "is_activation_checkpointing", None)  # its name from 5.25 on
    if checkpointing is None:
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    if checkpointing:
        return False
    if hasattr(next(inner.parameters(), None), "ds_id"):  # ZeRO-3 partitions every parameter
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < width:
        return False
    return cache_argument(model) is not None


def prefix_to_share(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, keep: int | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows' common prefix `(starts [B], ids [c])`: row `i`'s real tokens `starts[i] ..
    starts[i] + c` are `ids`, at positions `0 .. c-1`, in every row; None when sharing would not
    pay (`MIN_SHARED_COLUMNS`).

    Every row keeps at least one real token after the prefix, and with `keep` (the last `keep`
    columns wanted) the prefix ends before those columns, so they are the rest's last `keep`.
    """
    B, L = input_ids.shape
    if B < 2:
        return None
    real = attention_mask != 0
    starts = (~real).long().cumprod(-1).sum(-1)  # leading padding columns
    # Rows are compared column by column from their starts, up to the shortest that could share.
    limit = real.sum(-1) - 1
    if keep is not None:
        limit = torch.minimum(limit, L - keep - starts)
    most = int(limit.min().clamp(min=0))  # host syncs: this and the prefix's length
    if (B - 1) * most < MIN_SHARED_COLUMNS * B * L:
        return None
    offsets = torch.arange(most, device=input_ids.device)
    columns = starts[:, None] + offsets[None, :]
    ids = input_ids.gather(1, columns)
    same = (
        (ids == ids[:1]).all(0)
        & real.gather(1, columns).all(0)
        & (position_ids.gather(1, columns) == offsets[None, :]).all(0)
    )
    c = int(same.long().cumprod(0).sum())
    if (B - 1) * c < MIN_SHARED_COLUMNS * B * L:
        return None
    return starts, ids[0, :c]


def forward_logits(model: torch.nn.Module, kwargs: dict, keep: int | None = None) -> torch.Tensor:
    """`model(**kwargs).logits`, with the rows' common prefix run once where `can_share_prefix`
    and `prefix_to_share` allow. `keep`: only the last `keep` columns are read (the caller's
    `logits_to_keep`, or a slice it takes), so the prefix's outputs are not needed; None: every
    column, the prefix's put back in place. `kwargs` holds `input_ids`, `attention_mask` and
    `position_ids` as the model takes them (left-padded rows, positions counting real tokens)."""
    input_ids, attention_mask = kwargs["input_ids"], kwargs.get("attention_mask")
    position_ids = kwargs.get("position_ids")
    if attention_mask is None or position_ids is None or attention_mask.dim() != 2:
        return model(**kwargs).logits
    if not can_share_prefix(model, input_ids.shape[1]):
        return model(**kwargs).logits
    shared = prefix_to_share(input_ids, attention_mask, position_ids, keep)
    if shared is None:
        return model(**kwargs).logits
    return _forward_shared(model, kwargs, *shared, keep)


def rest_columns(starts: torch.Tensor, c: int, width: int) -> torch.Tensor:
    """`[B, width - c]` each row's original columns without its prefix's: its padding
    `0 .. starts[i]`, then `starts[i] + c .. width`."""
    column = torch.arange(width - c, device=starts.device)[None, :]
    return torch.where(column < starts[:, None], column, column + c)


def _after_prefix(rest_mask: torch.Tensor, c: int) -> torch.Tensor:
    """The attention mask over the cached prefix's `c` columns and the rest's."""
    ones = torch.ones(rest_mask.shape[0], c, dtype=rest_mask.dtype, device=rest_mask.device)
    return torch.cat([ones, rest_mask], 1)


def prefilled_prompts(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
    """Generation's prompts with their common prefix prefilled once, or None where that is not
    exact or would not pay (as `forward_logits`).

    Returns the prompts laid out as the cache holds them, `[prefix | row i's padding and rest]`
    (the same width; positions from the mask count real tokens, as before), their attention mask,
    and the `generate` keyword holding the prefix's cache for every row: `generate` then runs
    only the rest of each prompt before sampling. `model` is the transformers model (no engine).
    """
    B, L = input_ids.shape
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if not can_share_prefix(model, L):
        return None
    shared = prefix_to_share(input_ids, attention_mask, positions, keep=1)  # the last column samples
    if shared is None:
        return None
    starts, prefix_ids = shared
    c = prefix_ids.shape[0]
    _, cached = _prefix_cache(model, prefix_ids, B, attention_mask.dtype, logits_to_keep=1)
    rest = rest_columns(starts, c, L)
    ids = torch.cat([prefix_ids[None].expand(B, -1), input_ids.gather(1, rest)], 1)
    return ids, _after_prefix(attention_mask.gather(1, rest), c), cached


def _prefix_cache(model, prefix_ids: torch.Tensor, rows: int, mask_dtype, **kwargs) -> tuple[object, dict]:
    """The prefix's forward (a batch of one at positions `0 .. c-1`; `kwargs` go with it) and the
    forward keyword holding its cache, repeated for `rows` rows. The backward of the repeat sums
    the rows' gradients into the one prefix pass."""
    c, device = prefix_ids.shape[0], prefix_ids.device
    name, cache = cache_argument(model), DynamicCache()
    outputs = model(
        **{
            **kwargs,
            "input_ids": prefix_ids[None],
            "attention_mask": torch.ones(1, c, dtype=mask_dtype, device=device),
            "position_ids": torch.arange(c, device=device)[None],
            "use_cache": True,
            name: cache,
        }
    )
    cache.batch_repeat_interleave(rows)
    return outputs, {name: cache}


def _forward_shared(
    model, kwargs: dict, starts: torch.Tensor, prefix_ids: torch.Tensor, keep: int | None
) -> torch.Tensor:
    input_ids, attention_mask, position_ids = (
        kwargs["input_ids"],
        kwargs["attention_mask"],
        kwargs["position_ids"],
    )
    (B, L), c = input_ids.shape, prefix_ids.shape[0]
    device = input_ids.device
    prefix_kwargs = dict(kwargs)
    if keep is not None and "logits_to_keep" in kwargs:
        prefix_kwargs["logits_to_keep"] = 1  # the prefix's logits are not read
    prefix, cached = _prefix_cache(model, prefix_ids, B, attention_mask.dtype, **prefix_kwargs)
    rest = rest_columns(starts, c, L)
    rest_kwargs = {
        **kwargs,
        "input_ids": input_ids.gather(1, rest),
        "attention_mask": _after_prefix(attention_mask.gather(1, rest), c),
        "position_ids": position_ids.gather(1, rest),
        "use_cache": True,
        **cached,
    }
    logits = model(**rest_kwargs).logits
    if keep is not None:
        return logits
    # Every column back in place: [prefix outputs (c), rest outputs (L - c)] read at each row's
    # original columns (the prefix's at `starts[i] .. starts[i] + c`).
    both = torch.cat([prefix.logits.expand(B, -1, -1), logits], 1)
    original = torch.arange(L, device=device)[None, :]
    source = torch.where(
        original < starts[:, None],
        original + c,
        torch.where(original < starts[:, None] + c, original - starts[:, None], original),
    )
    return both.gather(1, source[..., None].expand(-1, -1, both.shape[-1]))
