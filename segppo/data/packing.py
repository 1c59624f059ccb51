"""Packing: several (prompt, response) sequences in one row, kept apart by the attention mask.

A padded `ResponseBatch` (DESIGN §2) pads every prompt to the longest prompt and every response to
the longest response, so on long-tailed preference data most of its columns are padding. A
`PackedBatch` instead lays sequences end to end in rows of at most `max_tokens` tokens (first-fit
decreasing), with

    input_ids      [R, W]  seq 0 (prompt|response) seq 1 (prompt|response) ... pad..pad
    position_ids   [R, W]  0..len0-1 0..len1-1 ...  0 0 (every sequence restarts at 0)
    sequence_ids   [R, W]  0 0 0 1 1 1 ... -1 -1    (index b of the sequence, -1 on padding)

and index maps back to the response-aligned `[B, T]` layout: response token `t` of sequence `b` is
at row `row[b]`, column `response_start[b] + t`. So with a causal model, exactly as in the padded
layout:

- entropy / RM values / critic values at response position `t` come from column `start + t`
  (`gather(per_token)`);
- the log-prob of response token `t` comes from the logits one column earlier, `start + t - 1`
  (`gather(per_token, shift=-1)`), which for `t = 0` is the prompt's last token: prompts must be
  non-empty.

Two ways to keep the sequences apart (`model_inputs`), chosen by the attention implementation
(`packing_mode`):

- `"mask"` (CPU, and any attention implementation that takes a 4D mask: eager, sdpa): a
  block-diagonal causal additive mask `[R, 1, W, W]`. transformers passes a 4D mask through
  unchanged. It costs `R·W²` per layer, so rows stay at the padded layout's width.
- `"varlen"` (flash attention: transformers gives it no 4D mask): the whole micro-batch in ONE row
  with no padding (`one_row=True`), no attention mask, `position_ids` restarting at every sequence
  and the boundaries as `cu_seq_lens_q/k` + `max_length_q/k` (what transformers'
  `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` passes), which transformers hands
  to flash-attention's variable-length kernel. One row is required: transformers 5 infers packed
  sequences from `position_ids` only when the batch size is 1 (`_is_packed_sequence`); with R ≥ 2
  rows and no `cu_seq_lens` it ran plain causal attention over each whole row, and the sequences
  of a row attended to each other. The same inputs also work on sdpa/eager (transformers then
  builds the block mask from `position_ids`, and ignores `cu_seq_lens`), which is how the CPU
  tests check them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from segppo.kernels import entropy_logprobs, sequence_scores
from segppo.segments import Segmentation

from .chat import EncodedPair
from .collate import ResponseBatch


@dataclass
class PackedBatch:
    """Sequences packed into rows, with the maps back to the response-aligned `[B, T]` layout."""

    input_ids: torch.Tensor  # [R, W] long
    position_ids: torch.Tensor  # [R, W] long, restarting at 0 for every sequence; 0 on padding
    sequence_ids: torch.Tensor  # [R, W] long, the sequence index b of every column, -1 on padding
    row: torch.Tensor  # [B] long, the row that holds sequence b
    response_start: torch.Tensor  # [B] long, the column of sequence b's response token 0
    response_mask: torch.Tensor  # [B, T] bool, t < L_b
    has_eos: torch.Tensor  # [B] bool

    @property
    def num_sequences(self) -> int:
        return self.row.shape[0]

    @property
    def attention_mask(self) -> torch.Tensor:
        """[R, W] long, 1 on real tokens (what a padded batch's mask would say; not sequence-aware)."""
        return (self.sequence_ids >= 0).long()

    @property
    def response_ids(self) -> torch.Tensor:
        """[B, T] the response tokens, padding (0) where response_mask is false."""
        return self.gather(self.input_ids)

    def block_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[R, 1, W, W] additive mask: 0 where query `q` may attend key `k` (same sequence, `k <= q`),
        the dtype's minimum elsewhere. A padding column attends only to itself so that no softmax
        row is empty (a fully masked row would give NaN, which would then leak through 0·NaN)."""
        seq = self.sequence_ids
        width = seq.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=seq.device).tril()
        same = seq[:, :, None] == seq[:, None, :]
        real = (seq >= 0)[:, :, None]
        diagonal = torch.eye(width, dtype=torch.bool, device=seq.device)
        allowed = (same & causal & real) | diagonal
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seq.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def model_inputs(self, mode: str = "mask", dtype: torch.dtype = torch.float32) -> dict:
        """Keyword arguments for a transformers forward: `mode` "mask" (a 4D block mask, any
        attention implementation that takes one) or "varlen" (one row, no mask, the sequence
        boundaries for flash-attention's variable-length kernel)."""
        if mode == "mask":
            return dict(
                input_ids=self.input_ids,
                attention_mask=self.block_mask(dtype),
                position_ids=self.position_ids,
            )
        if mode == "varlen":
            if self.input_ids.shape[0] != 1 or self.padding_tokens:
                raise ValueError(
                    f"flash attention's variable-length path needs the sequences in one row without "
                    f"padding (pack with one_row=True); got {self.input_ids.shape[0]} rows, "
                    f"{self.padding_tokens} padding tokens"
                )
            lengths = torch.unique_consecutive(self.sequence_ids[0], return_counts=True)[1]
            cu_seq_lens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            longest = int(lengths.max())
            return dict(
                input_ids=self.input_ids,
                position_ids=self.position_ids,
                cu_seq_lens_q=cu_seq_lens,
                cu_seq_lens_k=cu_seq_lens,
                max_length_q=longest,
                max_length_k=longest,
            )
        raise ValueError(f"packing mode must be 'mask' or 'varlen', not {mode!r}")

    def gather(self, per_token: torch.Tensor, shift: int = 0) -> torch.Tensor:
        """`[R, W, ...]` per-column outputs -> `[B, T, ...]` at response positions, zero where
        `response_mask` is false. `shift=-1` takes the column before each response token (the logits
        that score it)."""
        rows, width = self.input_ids.shape
        if per_token.shape[:2] != (rows, width):
            raise ValueError(
                f"per-token outputs have shape {tuple(per_token.shape)}; expected [{rows}, {width}, ...]"
            )
        t = torch.arange(self.response_mask.shape[1], device=per_token.device)
        columns = (self.response_start.to(per_token.device)[:, None] + t[None, :] + shift).clamp(0, width - 1)
        flat = self.row.to(per_token.device)[:, None] * width + columns  # [B, T]
        out = per_token.reshape(rows * width, *per_token.shape[2:])[flat]
        keep = self.response_mask.to(per_token.device).reshape(*flat.shape, *([1] * (per_token.dim() - 2)))
        return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))

    @property
    def padding_tokens(self) -> int:
        return int((self.sequence_ids < 0).sum())

    def to(self, device: torch.device | str) -> PackedBatch:
        tensors = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return dataclasses.replace(self, **tensors)


@dataclass
class PackedPreferenceBatch(PackedBatch):
    """2B packed sequences: the chosen responses of B pairs (b < B), then their rejected ones."""

    margin: torch.Tensor  # [B] float, 0 where a pair has no margin

    @property
    def num_pairs(self) -> int:
        return self.margin.shape[0]


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sequence indices whose lengths sum to at most `capacity` (a longer sequence gets a
    bin of its own); longest first, each into the first bin with room."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[index]
        target = next((b for b, free in enumerate(room) if free >= size), None)
        if target is None:
            bins.append([])
            room.append(capacity)
            target = len(bins) - 1
        bins[target].append(index)
        room[target] -= size
    return bins


def pack_responses(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    has_eos: Sequence[bool],
    pad_token_id: int,
    max_tokens: int | None = None,
    *,
    one_row: bool = False,
) -> PackedBatch:
    """Pack (prompt, response) sequences into rows of at most `max_tokens` tokens (or the longest
    sequence, if longer); by default the padded layout's width (longest prompt + longest response),
    so a packed batch has no more rows than the padded one and none wider. With `one_row` every
    sequence goes into a single row without padding (flash attention's variable-length path,
    `packs_in_one_row`)."""
    if not (len(prompts) == len(responses) == len(has_eos)) or not prompts:
        raise ValueError(
            f"need as many prompts, responses and has_eos, at least one: "
            f"{len(prompts)}, {len(responses)}, {len(has_eos)}"
        )
    if any(len(p) == 0 for p in prompts):
        raise ValueError(
            "packing needs a non-empty prompt for every sequence (its last token scores response token 0)"
        )
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    if one_row:
        if max_tokens is not None:
            raise ValueError("pack either into one row or into rows of max_tokens, not both")
        max_tokens = sum(lengths)
    if max_tokens is None:
        max_tokens = max(map(len, prompts)) + max(map(len, responses))
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    bins = first_fit_decreasing(lengths, max_tokens)
    width = max(sum(lengths[i] for i in b) for b in bins)
    input_ids = torch.full((len(bins), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    sequence_ids = torch.full((len(bins), width), -1, dtype=torch.long)
    row = torch.zeros(len(prompts), dtype=torch.long)
    response_start = torch.zeros(len(prompts), dtype=torch.long)
    for r, members in enumerate(bins):
        column = 0
        for b in sorted(members):  # input order within a row: deterministic and easy to read
            end = column + lengths[b]
            input_ids[r, column:end] = torch.as_tensor([*prompts[b], *responses[b]], dtype=torch.long)
            position_ids[r, column:end] = torch.arange(lengths[b])
            sequence_ids[r, column:end] = b
            row[b], response_start[b] = r, column + len(prompts[b])
            column = end
    response_lengths = torch.as_tensor([len(x) for x in responses])
    response_mask = torch.arange(int(response_lengths.max()))[None, :] < response_lengths[:, None]
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        sequence_ids=sequence_ids,
        row=row,
        response_start=response_start,
        response_mask=response_mask,
        has_eos=torch.as_tensor(list(has_eos), dtype=torch.bool),
    )


def pack_response_batch(
    batch: ResponseBatch, pad_token_id: int, max_tokens: int | None = None, *, one_row: bool = False
) -> PackedBatch:
    """The packed form of a padded `ResponseBatch` (same sequences, same `[B, T]` response layout)."""
    prompt_len = batch.prompt_len
    lengths = batch.response_mask.sum(-1).tolist()
    prompts = [batch.prompt_ids(b) for b in range(batch.input_ids.shape[0])]
    responses = [batch.input_ids[b, prompt_len : prompt_len + n].tolist() for b, n in enumerate(lengths)]
    return pack_responses(
        prompts, responses, batch.has_eos.tolist(), pad_token_id, max_tokens, one_row=one_row
    )


def pack_preferences(
    pairs: Sequence[EncodedPair], pad_token_id: int, max_tokens: int | None = None, *, one_row: bool = False
) -> PackedPreferenceBatch:
    """B pairs -> 2B packed sequences (chosen first, then rejected) with a [B] margin, like
    `collate_preferences`."""
    packed = pack_responses(
        prompts=[p.prompt_ids for p in pairs] * 2,
        responses=[p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
        has_eos=[p.chosen_has_eos for p in pairs] + [p.rejected_has_eos for p in pairs],
        pad_token_id=pad_token_id,
        max_tokens=max_tokens,
        one_row=one_row,
    )
    margin = torch.tensor([0.0 if p.margin is None else p.margin for p in pairs], dtype=torch.float32)
    return PackedPreferenceBatch(**vars(packed), margin=margin)


def padded_tokens(prompt_lengths: Sequence[int], response_lengths: Sequence[int]) -> int:
    """Padding columns of the padded layout (`collate_responses`): `B·(max P + max T) - real tokens`."""
    real = sum(prompt_lengths) + sum(response_lengths)
    return len(prompt_lengths) * (max(prompt_lengths) + max(response_lengths)) - real


def packing_mode(model) -> str:
    """How `model` keeps packed sequences apart: "varlen" when transformers gives its attention
    implementation no 4D mask (the flash-attention implementations, and the hub's flash kernels,
    whose mask function is `flash_attention_mask`), else the 4D block "mask"."""
    module = getattr(model, "module", model)  # unwrap a DeepSpeed engine
    implementation = getattr(module.config, "_attn_implementation", None)
    takes_no_4d_mask = ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) is flash_attention_mask
    return "varlen" if takes_no_4d_mask else "mask"


def packs_in_one_row(*models) -> bool:
    """Whether a micro-batch that all of `models` read is packed into one row: when any of them
    runs flash attention (`packing_mode` "varlen": transformers' variable-length path takes one
    row). Under the block mask rows stay at the padded layout's width instead: the mask costs
    `R·W²` however few of the pairs attend (measured on CPU: rows of 2048 tokens made RM training
    slower than padding; benchmarks/RESULTS.md, "Packing"), while flash attention costs per
    sequence, so one row of the whole micro-batch (never more tokens than its padded layout)
    is free. The other models read the one row through their own mode."""
    return any(packing_mode(m) == "varlen" for m in models if m is not None)


def _forward(model, packed: PackedBatch, mode: str | None):
    module = getattr(model, "module", model)  # unwrap a DeepSpeed engine
    mode = mode or packing_mode(model)
    if "position_ids" not in inspect.signature(module.forward).parameters:
        raise ValueError(f"{type(module).__name__} takes no position_ids; it cannot run packed")
    # The additive mask is in the model's compute dtype (its minimum is what "masked" means there).
    dtype = next(p.dtype for p in module.parameters() if p.dtype.is_floating_point)
    return model(**packed.model_inputs(mode, dtype), use_cache=False)


def packed_reward_values(model, packed: PackedBatch, mode: str | None = None) -> torch.Tensor:
    """The reward model's (or critic's) per-token values at response positions, `[B, T]` float32,
    0 where `response_mask` is false; differentiable. Same numbers as `reward_values(...)[:, P:]`."""
    values = _forward(model, packed, mode).logits[..., 0].float()
    return packed.gather(values)


def packed_logprobs_and_entropy(
    model, packed: PackedBatch, mode: str | None = None, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens and the entropy at each response position, `[B, T]` float32,
    as `segppo.segments.logprobs_and_entropy` gives on the padded batch.

    Every column goes through the LM head (prompts included): packed rows have no common prompt
    width to cut with `logits_to_keep`.
    """
    logits = _forward(model, packed, mode).logits
    next_tokens = torch.nn.functional.pad(packed.input_ids[:, 1:], (0, 1), value=0)  # column c scores c+1
    entropy, logprobs = entropy_logprobs(logits, next_tokens, temperature=temperature)
    return packed.gather(logprobs, shift=-1), packed.gather(entropy)


def packed_critic_values(critic, packed: PackedBatch, mode: str | None = None) -> torch.Tensor:
    """V_t `[B, T]` float32 for each response token: the critic's value at the column before token
    t (the state before it), as `segppo.ppo.rollout.critic_values` gives on the padded batch."""
    values = _forward(critic, packed, mode).logits[..., 0].float()
    return packed.gather(values, shift=-1)


@torch.no_grad()
def packed_entropy(segmenter, packed: PackedBatch, mode: str | None = None) -> torch.Tensor:
    """The segmenter's entropy `[B, T]` float32 at each response position (column `start + t`, as
    `segppo.segments.segmenter_entropy` reads column `P + t` of the padded batch)."""
    logits = _forward(segmenter, packed, mode).logits
    entropy, _ = entropy_logprobs(logits)
    return packed.gather(entropy)


def packed_scores(reward_model, segmenter, packed: PackedBatch, segmentation: Segmentation) -> torch.Tensor:
    """`[B]` sequence scores (mean RM value at segment ends), the numbers
    `segppo.rm.scoring.score_responses` gives on the padded batch; differentiable w.r.t. the RM."""
    if segmentation.needs_entropy:
        if segmenter is None:
            raise ValueError("a segment-level reward model needs a segmenter to compute entropy")
        entropy = packed_entropy(segmenter, packed)
    else:
        entropy = torch.zeros(packed.response_mask.shape, device=packed.input_ids.device)
    return sequence_scores(
        packed_reward_values(reward_model, packed),
        entropy,
        packed.response_mask,
        granularity=segmentation.granularity,
        threshold=segmentation.threshold,
        has_eos=packed.has_eos,
    )
