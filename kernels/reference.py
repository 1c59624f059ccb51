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


# Float32 elements of one chunk of rows (each of the two working buffers): bounds the reference's
# extra memory. Small enough that a chunk's passes run out of the CPU's L2/L3 cache rather than
# DRAM, large enough that the per-op overhead of a chunk stays small next to its work.
_ENTROPY_CHUNK_ELEMENTS = 1 << 18


def _centred_rows(x: torch.Tensor, row_max: torch.Tensor, inv_temp: float, out: torch.Tensor) -> None:
    """out = x·inv_temp − row_max in float32; x [r, V] any float dtype, row_max [r, 1] float32.

    Half-precision chunks are converted by a plain copy first: a mixed-dtype elementwise op takes
    a slow path on CPU. The forward and the backward use this same function, so they see the same
    float32 values.
    """
    if x.dtype == torch.float32:
        if inv_temp == 1.0:
            torch.sub(x, row_max, out=out)
            return
        torch.mul(x, inv_temp, out=out)
    else:
        out.copy_(x)
        if inv_temp != 1.0:
            out.mul_(inv_temp)
    out.sub_(row_max)


def _row_max(x: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """max(x·inv_temp) per row as float32 [r, 1], rounded exactly as `_centred_rows` rounds x."""
    row_max = x.amax(-1, keepdim=True).float()
    return row_max.mul_(inv_temp) if inv_temp != 1.0 else row_max


def _zero_masked(xc: torch.Tensor) -> torch.Tensor:
    """Masked entries (xc = -inf, p = 0) to 0 so that p·xc is 0, not NaN; NaN stays NaN."""
    return xc.nan_to_num_(nan=math.nan, posinf=math.inf, neginf=0.0)


def _chunk_rows(vocab: int) -> int:
    return max(1, _ENTROPY_CHUNK_ELEMENTS // max(vocab, 1))


def _entropy_forward(
    flat: torch.Tensor, targets: torch.Tensor | None, inv_temp: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """flat [N, V] any float dtype, targets [N] int64 or None.

    Returns float32 `(entropy [N], logprobs [N] | None, stats [N, 3], masked [N] bool)`: stats are
    (max x, logZ − max x, E[x] − max x) of x = flat·inv_temp, as the Triton kernel stores them, and
    `masked` flags the rows whose entropy needed -inf entries zeroed (or that hold a NaN).
    """
    n_rows, vocab = flat.shape
    stats = torch.empty(n_rows, 3, dtype=torch.float32, device=flat.device)
    entropy = torch.empty(n_rows, dtype=torch.float32, device=flat.device)
    logprobs = torch.empty_like(entropy) if targets is not None else None
    masked = torch.zeros(n_rows, dtype=torch.bool, device=flat.device)
    rows = max(1, min(_chunk_rows(vocab), n_rows))
    xc_buf = flat.new_empty(rows, vocab, dtype=torch.float32)
    p_buf = torch.empty_like(xc_buf)
    for start in range(0, n_rows, rows):  # chunks of rows, not tokens: bounds memory only
        x = flat[start : start + rows]
        r = x.shape[0]
        xc, p = xc_buf[:r], p_buf[:r]
        # Centred on the row max: float32 keeps its accuracy at any logit offset. A fully masked
        # row (max -inf) turns into NaN here, as does any row holding a NaN.
        row_max = _row_max(x, inv_temp)
        _centred_rows(x, row_max, inv_temp, out=xc)
        torch.softmax(xc, -1, out=p)
        # p at the max is exactly 1/Σexp(xc), so log Z − max = −log max p: no second exp pass.
        log_s = p.amax(-1).log_().neg_()
        if targets is not None:
            tgt = targets[start : start + r, None]
            logprobs[start : start + r] = xc.gather(-1, tgt).squeeze(-1) - log_s
        mean_c = xc.mul_(p).sum(-1)  # E[xc] = Σ p·xc; xc is spent from here on
        # A masked entry made p·xc = 0·(-inf) = NaN: redo just those rows with it zeroed. Rows
        # without -inf (the usual case) pay nothing for this check.
        bad = torch.isnan(mean_c).nonzero().squeeze(-1)
        if bad.numel():
            masked[start + bad] = True
            xc_bad = torch.empty(bad.numel(), vocab, dtype=torch.float32, device=flat.device)
            _centred_rows(x[bad], row_max[bad], inv_temp, out=xc_bad)
            mean_c[bad] = _zero_masked(xc_bad).mul_(p[bad]).sum(-1)
        stats[start : start + r, 0] = row_max.squeeze(-1)
        stats[start : start + r, 1] = log_s
        stats[start : start + r, 2] = mean_c
        entropy[start : start + r] = log_s - mean_c
    return entropy, logprobs, stats, masked


def _entropy_backward(
    flat: torch.Tensor,
    targets: torch.Tensor | None,
    stats: torch.Tensor,
    masked: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    grad_logprobs: torch.Tensor | None,
    inv_temp: float,
) -> torch.Tensor:
    """dL/dflat [N, V] in flat's dtype, with p = softmax(x) recomputed chunk by chunk:

    dH/dx_i = −p_i (x_i − E[x]),  dlogp/dx_i = δ(i, target) − p_i,  dx/dflat = inv_temp, so
    grad_i = p_i·(a·xc_i + b) + c·δ(i, target) with per-row a = −g_H·inv_temp,
    b = (g_H·(E[x] − max) − g_lp)·inv_temp, c = g_lp·inv_temp.
    """
    n_rows, vocab = flat.shape
    grad = torch.empty(n_rows, vocab, dtype=flat.dtype, device=flat.device)
    rows = max(1, min(_chunk_rows(vocab), n_rows))
    xc_buf = flat.new_empty(rows, vocab, dtype=torch.float32)
    p_buf = torch.empty_like(xc_buf)
    g_h = grad_entropy.reshape(-1, 1).float() if grad_entropy is not None else None
    g_lp = grad_logprobs.reshape(-1, 1).float() if grad_logprobs is not None else None
    if g_lp is not None and targets is None:
        g_lp = None  # no logprobs output: nothing flows back through it
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        x, out = flat[start:stop], grad[start:stop]
        r = stop - start
        xc, p = xc_buf[:r], p_buf[:r]
        _centred_rows(x, stats[start:stop, 0:1], inv_temp, out=xc)
        torch.softmax(xc, -1, out=p)
        if g_h is None:
            coeff = p.mul_(g_lp[start:stop] * -inv_temp)  # grad = c·(δ − p)
        else:
            if masked[start:stop].any():
                _zero_masked(xc)  # p = 0 there: the entropy term must be 0, not 0·inf
            a = g_h[start:stop] * -inv_temp
            b = g_h[start:stop] * stats[start:stop, 2:3]
            if g_lp is not None:
                b = b - g_lp[start:stop]
            coeff = xc.mul_(a).add_(b.mul_(inv_temp))
        if g_lp is None:
            if g_h is not None:
                torch.mul(p, coeff, out=out)
            else:
                out.copy_(coeff)
            continue
        tgt = targets[start:stop, None]
        # The target entry, summed in float32 before the one rounding to the output dtype.
        at_target = g_lp[start:stop] * inv_temp
        if g_h is not None:
            at_target = at_target + p.gather(-1, tgt) * coeff.gather(-1, tgt)
            torch.mul(p, coeff, out=out)
        else:
            at_target = at_target + coeff.gather(-1, tgt)
            out.copy_(coeff)
        out.scatter_(-1, tgt, at_target.to(out.dtype))
    return grad


class _EntropyLogprobs(torch.autograd.Function):
    """Saves the logits (no copy), the targets and a few numbers per row; the backward recomputes
    softmax chunk by chunk instead of keeping float32 copies of the logits alive."""

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        flat_targets = targets.reshape(-1).long() if targets is not None else None
        entropy, logprobs, stats, masked = _entropy_forward(flat, flat_targets, 1.0 / temperature)
        ctx.save_for_backward(logits, flat_targets, stats, masked)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # an unused output's grad arrives as None and is skipped
        lead = logits.shape[:-1]
        return entropy.view(lead), logprobs.view(lead) if logprobs is not None else None

    @staticmethod
    def backward(ctx, grad_entropy, grad_logprobs):
        logits, targets, stats, masked = ctx.saved_tensors
        if grad_entropy is None and (grad_logprobs is None or targets is None):
            return None, None, None
        flat = logits.reshape(-1, logits.shape[-1])
        grad = _entropy_backward(
            flat, targets, stats, masked, grad_entropy, grad_logprobs, 1.0 / ctx.temperature
        )
        return grad.view(logits.shape), None, None


def entropy_logprobs(
    logits: torch.Tensor, targets: torch.Tensor | None = None, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entropy of softmax(logits / temperature) and log-probs of `targets`.

    logits [..., V] any float dtype; targets [...] int64 or None. Returns float32 `[...]` tensors;
    both are differentiable w.r.t. logits. NaN logits give NaN; -inf logits are masked entries.
    Works on chunks of rows with float32 working memory of a few chunk buffers, whatever N; the
    logits are saved for the backward as they are (no float32 copy).
    """
    return _EntropyLogprobs.apply(logits, targets, float(temperature))


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
