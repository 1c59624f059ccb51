"""Plain-torch references for every op of `segppo.kernels`.

These are the semantics of DESIGN.md §3 written as vectorized torch (no Python loop over rows or
tokens). They run on any device, serve as the CPU path, and are what the Triton kernels are
tested against. Arguments are assumed valid: the public functions check them first.

Shapes: `B` rows, `T` response positions, `V` vocabulary entries. A row's response length is
`L = response_mask.sum()`; the mask is expected to be a prefix (true for `t < L`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class SegmentRewards(NamedTuple):
    rewards: torch.Tensor  # [B, T] float32, dense per-token rewards
    ends: torch.Tensor  # [B, T] bool, true at segment ends
    num_segments: torch.Tensor  # [B] int64, K (0 only for an empty response)


# Rows of logits turned into float32 at a time; bounds the reference's extra memory.
_ENTROPY_CHUNK_ELEMENTS = 1 << 24


def entropy_logprobs(
    logits: torch.Tensor, targets: torch.Tensor | None = None, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entropy of softmax(logits / temperature) and log-probs of `targets`.

    logits [..., V] any float dtype; targets [...] int64 or None. Returns float32 `[...]` tensors;
    both are differentiable w.r.t. logits. NaN logits give NaN; -inf logits are masked entries.
    """
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    flat_targets = targets.reshape(-1) if targets is not None else None
    rows = max(1, _ENTROPY_CHUNK_ELEMENTS // max(vocab, 1))
    entropies, logprobs = [], []
    for start in range(0, flat.shape[0], rows):  # chunks of rows, not tokens: bounds memory only
        x = flat[start : start + rows].float() / temperature
        # Centred on the row max: float32 keeps its accuracy at any logit offset. A fully masked
        # row (max -inf) turns into NaN here, as does any row holding a NaN.
        x = x - x.amax(-1, keepdim=True).detach()
        log_z = torch.logsumexp(x, dim=-1, keepdim=True)
        probs = torch.exp(x - log_z)
        # Masked (-inf) entries contribute p·x = 0; zeroing x (not p·x) keeps their gradient finite.
        finite_x = torch.where(x == float("-inf"), torch.zeros_like(x), x)
        entropies.append(log_z.squeeze(-1) - (probs * finite_x).sum(-1))
        if flat_targets is not None:
            tgt = flat_targets[start : start + rows, None]
            logprobs.append((x.gather(-1, tgt) - log_z).squeeze(-1))
    empty = logits.new_zeros(0, dtype=torch.float32)
    entropy = (torch.cat(entropies) if entropies else empty).reshape(lead)
    if flat_targets is None:
        return entropy, None
    return entropy, (torch.cat(logprobs) if logprobs else empty).reshape(lead)


def segment_ends(
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    granularity: str,
    threshold: float,
    has_eos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ends `[B, T]` bool and segment counts `[B]` int64 (DESIGN.md §3.1).

    `granularity` must already be resolved (see `resolve_granularity`).
    """
    B, T = response_mask.shape
    pos = torch.arange(T, device=response_mask.device)
    length = response_mask.sum(-1)
    eos = has_eos.long() if has_eos is not None else torch.ones_like(length)
    if granularity == "bandit":
        ends = pos == (length - 1)[:, None]
    else:
        last = length - 1 - eos  # E: the last position of the segmentable span
        # A response that is only an EOS has one segment: the EOS itself.
        ends = pos == torch.where(last >= 0, last, length - 1)[:, None]
        if granularity == "token":
            ends |= pos <= last[:, None]
        else:
            ends |= _spikes(entropy, threshold) & (pos < last[:, None])
    return ends, ends.sum(-1)


def float32_floor(threshold: float) -> float:
    """The largest float32 not above `threshold`: a float32 `x` exceeds it exactly when `x > threshold`.

    A Python float compared with a float32 (or bf16) tensor is rounded to the tensor's precision
    first, which can turn a value just above the threshold into a tie; rounding down keeps §3.1's
    strict `>` exact for every dtype float32 holds.
    """
    below = torch.tensor(threshold, dtype=torch.float32)
    if below.item() > threshold:
        below = torch.nextafter(below, torch.tensor(-math.inf))
    return below.item()


def _spikes(entropy: torch.Tensor, threshold: float) -> torch.Tensor:
    """`entropy > threshold`, exact whatever the dtype of `entropy`."""
    if entropy.dtype == torch.float64:
        return entropy > threshold
    return entropy.float() > float32_floor(threshold)


def _normalize(raw, k, num, normalizer, sigma_floor):
    """(r - μ(p)) / σ(p) with p = k/K, μ = a ln p + c, σ = max(b ln p + d, floor)."""
    if normalizer is None:
        return raw
    a, b, c, d = normalizer
    log_p = torch.log(k.float() / num.clamp(min=1).float())
    mean = a * log_p + c
    std = (b * log_p + d).clamp(min=sigma_floor)
    return (raw - mean) / std


def segment_rewards(
    rm_values: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    granularity: str = "segment",
    threshold: float = 2.0,
    has_eos: torch.Tensor | None = None,
    normalizer: tuple[float, float, float, float] | None = None,
    sigma_floor: float = 1e-2,
    distribute: str = "interpolate",
) -> SegmentRewards:
    """Dense per-token rewards from the RM's value at each segment end (DESIGN.md §3.4)."""
    ends, num = segment_ends(
        entropy, response_mask, granularity=granularity, threshold=threshold, has_eos=has_eos
    )
    B, T = ends.shape
    if T == 0:
        return SegmentRewards(torch.zeros(B, 0, device=ends.device), ends, num)
    if granularity == "bandit":
        distribute = "end"  # the single reward sits on the last token
    pos = torch.arange(T, device=ends.device).expand(B, T)
    ends_before = ends.long().cumsum(-1) - ends.long()  # ends strictly before t
    in_segment = ends_before < num[:, None]  # t is at or before the last end
    seg = ends_before.clamp(max=T - 1)  # 0-based index of t's segment
    # end_pos[b, j]: position of the end of segment j (column T catches non-ends).
    end_pos = torch.zeros(B, T + 1, dtype=torch.long, device=ends.device)
    end_pos.scatter_(1, torch.where(ends, ends_before, T), pos)
    end_pos = end_pos[:, :T]
    seg_end = end_pos.gather(1, seg)
    prev_end = torch.where(seg > 0, end_pos.gather(1, (seg - 1).clamp(min=0)), -1)
    raw = rm_values.float().gather(1, seg_end)
    value = _normalize(raw, seg + 1, num[:, None], normalizer, sigma_floor)
    if distribute == "interpolate":
        value = value / (seg_end - prev_end).float()
    elif distribute == "end":
        in_segment = in_segment & ends
    rewards = torch.where(in_segment, value, torch.zeros_like(value))
    return SegmentRewards(rewards, ends, num)


def sequence_scores(
    rm_values: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    granularity: str,
    threshold: float,
    has_eos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of `rm_values` at the segment ends, `[B]` float32; 0 for an empty response.

    Differentiable w.r.t. `rm_values` (the RM's Bradley-Terry score, DESIGN.md §3.2).
    """
    ends, num = segment_ends(
        entropy, response_mask, granularity=granularity, threshold=threshold, has_eos=has_eos
    )
    total = torch.where(ends, rm_values.float(), torch.zeros((), device=ends.device)).sum(-1)
    return total / num.clamp(min=1).float()


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens (DESIGN.md §3.5).

    Returns float32 `(advantages, returns)`, both `[B, T]` and 0 outside the response. The reverse
    recurrence `A_t = δ_t + γλ A_{t+1}` runs as a doubling scan: log2(T) steps whose weights
    (γλ)^(2^j) never exceed 1, so it keeps float32 accuracy at any T (no (γλ)^-t rescaling).
    """
    mask = response_mask.bool()
    zero = torch.zeros((), device=mask.device)
    # where, not multiply: padding may hold NaN/inf, and NaN·0 is NaN
    r = torch.where(mask, rewards.float(), zero)
    if mask.shape[1] == 0:
        return r, r.clone()
    v = torch.where(mask, values.float(), zero)
    v_next = torch.nn.functional.pad(v[:, 1:], (0, 1))
    adv = r + gamma * v_next - v
    decay = gamma * lam
    shift, T = 1, adv.shape[1]
    while shift < T:
        adv = adv + decay * torch.nn.functional.pad(adv[:, shift:], (0, shift))
        shift *= 2
        decay *= decay
    adv = torch.where(mask, adv, zero)
    return adv, adv + v
