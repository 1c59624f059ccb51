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
# extra memory. Measured on CPU (one thread, V = 32k and 128k): 2^20 (4 MiB buffers) keeps a
# chunk's passes in cache and the per-chunk op overhead small; 2^24 ran 1.5-3x slower, 2^17 1.2x.
_ENTROPY_CHUNK_ELEMENTS = 1 << 20


def _row_max(x: torch.Tensor, out: torch.Tensor) -> None:
    """out [r, 1] float32 = max of each row of x (before the temperature)."""
    if x.dtype == torch.float32:
        torch.amax(x, -1, keepdim=True, out=out)
    else:
        out.copy_(x.amax(-1, keepdim=True))


def _centred_rows(x: torch.Tensor, row_max: torch.Tensor, inv_temp: float, out: torch.Tensor) -> None:
    """out = (x − row_max)·inv_temp in float32; x [r, V] any float dtype, row_max [r, 1] float32.

    Centring before scaling keeps float32 accuracy at any logit offset and temperature (x·inv_temp
    first would round at the scale of the logits). Other dtypes are converted by a plain copy
    first: a mixed-dtype elementwise op takes a slow path on CPU. The forward and the backward both
    use this, so they see the same float32 values.
    """
    if x.dtype == torch.float32:
        torch.sub(x, row_max, out=out)
    else:
        out.copy_(x)
        out.sub_(row_max)
    if inv_temp != 1.0:
        out.mul_(inv_temp)


def _zero_masked(xc: torch.Tensor) -> torch.Tensor:
    """Masked entries (xc = -inf, where p = 0) to 0, so that p·xc is 0 rather than NaN; NaN stays."""
    return xc.nan_to_num_(nan=math.nan, posinf=math.inf, neginf=0.0)


def _chunk_buffers(flat: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Rows per chunk and two float32 working buffers of that many rows."""
    n_rows, vocab = flat.shape
    rows = max(1, min(_ENTROPY_CHUNK_ELEMENTS // vocab, n_rows))
    buf = flat.new_empty(rows, vocab, dtype=torch.float32)
    return rows, buf, torch.empty_like(buf)


def _entropy_forward(
    flat: torch.Tensor, targets: torch.Tensor | None, inv_temp: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """flat [N, V] any float dtype, targets [N] int64 or None.

    Returns float32 `(entropy [N], logprobs [N] | None, stats [3, N, 1], masked [N] bool)`. With
    x = flat·inv_temp, stats hold (max flat, logZ − max x, E[x] − max x) per row, the Triton
    kernel's three numbers except that the max is taken before the temperature; `masked` flags
    the rows where a -inf (or a NaN) made p·x NaN and needed a second look.
    """
    n_rows = flat.shape[0]
    stats = flat.new_empty(3, n_rows, 1, dtype=torch.float32)
    row_max, log_s, mean_c = stats.unbind(0)
    logprobs = flat.new_empty(n_rows, 1, dtype=torch.float32) if targets is not None else None
    masked = flat.new_zeros(n_rows, dtype=torch.bool)
    rows, xc_buf, p_buf = _chunk_buffers(flat)
    for start in range(0, n_rows, rows):  # chunks of rows, not tokens: bounds memory only
        stop = min(start + rows, n_rows)
        x, xc, p = flat[start:stop], xc_buf[: stop - start], p_buf[: stop - start]
        # Centred on the row max: float32 keeps its accuracy at any logit offset. A fully masked
        # row (max -inf) turns into NaN here, as does any row holding a NaN.
        m = row_max[start:stop]
        _row_max(x, out=m)
        _centred_rows(x, m, inv_temp, out=xc)
        torch.softmax(xc, -1, out=p)
        # p at the max is exactly 1/Σexp(xc): logZ − max = −log(max p), taken after the loop.
        torch.amax(p, -1, keepdim=True, out=log_s[start:stop])
        if targets is not None:
            torch.gather(xc, -1, targets[start:stop, None], out=logprobs[start:stop])
        w = mean_c[start:stop]
        torch.sum(xc.mul_(p), -1, keepdim=True, out=w)  # E[xc] = Σ p·xc; xc is spent
        if w.isnan().any():
            # A masked entry made p·xc = 0·(-inf) = NaN: redo those rows with it zeroed. Rows
            # without -inf (the usual case) pay only this check.
            bad = w.squeeze(-1).isnan().nonzero().squeeze(-1)
            masked[start + bad] = True
            xc_bad = torch.empty_like(xc[: bad.numel()])
            _centred_rows(x[bad], m[bad], inv_temp, out=xc_bad)
            w[bad] = _zero_masked(xc_bad).mul_(p[bad]).sum(-1, keepdim=True)
    log_s.log_().neg_()
    entropy = (log_s - mean_c).squeeze(-1)
    return entropy, logprobs.sub_(log_s).squeeze(-1) if targets is not None else None, stats, masked


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
    b = (g_H·(E[x] − max) − g_lp)·inv_temp, c = g_lp·inv_temp (either grad may be None).
    """
    n_rows = flat.shape[0]
    grad = torch.empty_like(flat, memory_format=torch.contiguous_format)
    rows, xc_buf, p_buf = _chunk_buffers(flat)
    row_max, mean_c = stats[0], stats[2]
    c = grad_logprobs.reshape(-1, 1).float() * inv_temp if grad_logprobs is not None else None
    if grad_entropy is not None:
        g_h = grad_entropy.reshape(-1, 1).float()
        a = g_h * -inv_temp
        b = g_h * mean_c * inv_temp
        if c is not None:
            b = b - c
        masked_chunks = set((masked.nonzero().squeeze(-1) // rows).tolist())
    else:
        factor = -c  # grad = c·(δ − p)
    # Only the entropy term needs xc; without it fp32 logits go to softmax as they are (softmax
    # centres on the row max itself).
    direct = grad_entropy is None and flat.dtype == torch.float32 and inv_temp == 1.0
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        x, out = flat[start:stop], grad[start:stop]
        xc, p = xc_buf[: stop - start], p_buf[: stop - start]
        if direct:
            torch.softmax(x, -1, out=p)
        else:
            _centred_rows(x, row_max[start:stop], inv_temp, out=xc)
            torch.softmax(xc, -1, out=p)
        if grad_entropy is not None:
            if start // rows in masked_chunks:
                _zero_masked(xc)  # p = 0 there: the entropy term must be 0, not 0·inf
            chunk_factor = xc.mul_(a[start:stop]).add_(b[start:stop])
        else:
            chunk_factor = factor[start:stop]
        # Accumulate in float32 and round once: straight into a float32 gradient, else in p.
        if out.dtype == torch.float32:
            acc = torch.mul(p, chunk_factor, out=out)
        else:
            acc = p.mul_(chunk_factor)
        if c is not None:
            acc.scatter_add_(-1, targets[start:stop, None], c[start:stop])
        if acc is not out:
            out.copy_(acc)
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
        if targets is None:
            grad_logprobs = None  # no logprobs output: nothing flows back through it
        if grad_entropy is None and grad_logprobs is None:
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
