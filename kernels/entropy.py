"""entropy_logprobs: per-token entropy and target log-probs in one pass over the vocabulary.

Triton: one program per row streams the vocabulary in blocks with an online softmax (running max,
Σexp, Σx·exp), so logits are read once in their own dtype and no float32 copy is made. The
backward is a second streaming pass that rebuilds p from three saved per-row numbers.
"""

from __future__ import annotations

import torch

from . import reference
from ._checks import check_float
from ._dispatch import HAS_TRITON, device_guard, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

# Largest vocabulary block a program holds in registers. 4096 fp32 values over 8 warps is 16 per
# thread: enough in flight to saturate HBM without spilling. Tests lower it to exercise the
# online rescaling on small vocabularies.
MAX_BLOCK_V = 4096


def _launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of `n_cols` entries."""
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)
    num_warps = 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1
    return block, num_warps


if HAS_TRITON:

    @triton.jit
    def _entropy_logprobs_fwd_kernel(
        X_ptr,
        X_stride,
        T_ptr,
        H_ptr,
        LP_ptr,
        STATS_ptr,
        n_cols,
        inv_temp,
        HAS_TARGETS: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One row of x = logits / T: H = logZ - E[x], logp = x[target] - logZ.

        X [N, V] (row stride X_stride, unit column stride), T [N] int64; H, LP [N] f32;
        STATS [N, 3] f32 receives (max x, logZ - max x, E[x] - max x) for the backward.
        """
        row = tl.program_id(0).to(tl.int64)  # int64: N·V passes 2^31 at 16k rows of a 128k vocab
        X_ptr += row * X_stride
        offs = tl.arange(0, BLOCK_V)

        m = -float("inf")  # running max of x
        s = 0.0  # Σ exp(x - m)
        # Σ (x - m)·exp(x - m): centred on the running max so that H = log s - w/s never subtracts
        # two numbers of the size of the logits (m + log s - E[x] would cancel badly at |x| ~ 1e3).
        w = 0.0
        # NaN lanes are OR-ed elementwise and reduced once at the end: tl.max may drop NaN depending
        # on the backend, and a NaN row must never come out finite.
        nan_lanes = tl.zeros([BLOCK_V], dtype=tl.int32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            x = tl.load(X_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32) * inv_temp
            nan_lanes = nan_lanes | (x != x).to(tl.int32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # While every entry so far is -inf nothing has been accumulated and any finite shift is
            # right; shifting by -inf itself would turn exp(x - m) into exp(NaN).
            m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
            shift = tl.where(s > 0.0, m - m_use, 0.0)  # s > 0 implies m finite (and m_use)
            alpha = tl.exp(shift)
            xc = x - m_use
            p = tl.exp(xc)
            # Masked entries have p = 0 but xc = -inf, and -inf·0 is NaN: they contribute nothing.
            xp = tl.where(x == -float("inf"), 0.0, xc) * p
            w = alpha * (w + shift * s) + tl.sum(xp, axis=0)
            s = alpha * s + tl.sum(p, axis=0)
            # Carry the real max: m_use is only a shift. Pinning m at the stand-in 0 after an
            # all -inf first block would make every later exp underflow once x < -87 (H = NaN).
            m = m_new

        # A fully masked row has s = 0: log s = -inf and both outputs come out NaN, as they should.
        bad = tl.max(nan_lanes, axis=0) > 0
        log_s = tl.where(bad, float("nan"), tl.log(s))
        mean_c = w / s
        tl.store(H_ptr + row, log_s - mean_c)
        # Stats stay relative to the max, so logZ and E[x] are never rounded at the logits' scale.
        tl.store(STATS_ptr + 3 * row, m)
        tl.store(STATS_ptr + 3 * row + 1, log_s)
        tl.store(STATS_ptr + 3 * row + 2, mean_c)
        if HAS_TARGETS:
            target = tl.load(T_ptr + row)
            valid = (target >= 0) & (target < n_cols)
            # An out-of-range id reads column 0 and reports NaN rather than reading out of bounds.
            x_t = tl.load(X_ptr + tl.where(valid, target, 0)).to(tl.float32) * inv_temp
            tl.store(LP_ptr + row, tl.where(valid, (x_t - m) - log_s, float("nan")))

    @triton.jit
    def _entropy_logprobs_bwd_kernel(
        X_ptr,
        X_stride,
        G_ptr,
        G_stride,
        T_ptr,
        STATS_ptr,
        GH_ptr,
        GLP_ptr,
        n_cols,
        inv_temp,
        HAS_GRAD_H: tl.constexpr,
        HAS_GRAD_LP: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """dL/dlogits for one row, with p = exp(x - logZ):

        dH/dx_i = -p_i (x_i - E[x]),  dlogp/dx_i = δ(i, target) - p_i,  dx/dlogits = 1/T.
        X, G [N, V] (G in the logits' dtype); T, GH, GLP [N]; STATS [N, 3] from the forward.
        """
        row = tl.program_id(0).to(tl.int64)
        X_ptr += row * X_stride
        G_ptr += row * G_stride
        offs = tl.arange(0, BLOCK_V)
        m = tl.load(STATS_ptr + 3 * row)
        log_s = tl.load(STATS_ptr + 3 * row + 1)
        mean_c = tl.load(STATS_ptr + 3 * row + 2)
        g_h = 0.0
        g_lp = 0.0
        target = -1
        if HAS_GRAD_H:
            g_h = tl.load(GH_ptr + row)
        if HAS_GRAD_LP:
            g_lp = tl.load(GLP_ptr + row)
            target = tl.load(T_ptr + row)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            in_row = cols < n_cols
            x = tl.load(X_ptr + cols, mask=in_row, other=-float("inf")).to(tl.float32) * inv_temp
            xc = x - m
            p = tl.exp(xc - log_s)
            grad = tl.zeros([BLOCK_V], dtype=tl.float32)
            if HAS_GRAD_H:
                # Masked entries: p = 0 and x - E[x] = -inf; their gradient is exactly 0.
                grad -= g_h * p * tl.where(x == -float("inf"), 0.0, xc - mean_c)
            if HAS_GRAD_LP:
                grad += g_lp * (tl.where(cols == target, 1.0, 0.0) - p)
            tl.store(G_ptr + cols, (grad * inv_temp).to(G_ptr.dtype.element_ty), mask=in_row)


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with unit column stride; a view whenever the layout allows one."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernels need unit column stride; rows may be strided
    return logits.reshape(-1, logits.shape[-1])


def entropy_logprobs_forward(x: torch.Tensor, targets: torch.Tensor | None, temperature: float):
    """x [N, V] any float dtype with unit column stride; targets [N] int64 or None.

    Returns float32 `(entropy [N], logprobs [N] | None, stats [N, 3])` of x / temperature, where
    stats holds (max, logZ - max, E[x] - max) per row for the backward.
    """
    n_rows, n_cols = x.shape
    entropy = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    logprobs = torch.empty_like(entropy) if targets is not None else None
    stats = torch.empty((n_rows, 3), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return entropy, logprobs, stats
    block, num_warps = _launch_config(n_cols)
    with device_guard(x):
        _entropy_logprobs_fwd_kernel[(n_rows,)](
            x,
            x.stride(0),
            targets if targets is not None else entropy,  # unused when HAS_TARGETS is False
            entropy,
            logprobs if logprobs is not None else entropy,
            stats,
            n_cols,
            1.0 / temperature,
            HAS_TARGETS=targets is not None,
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return entropy, logprobs, stats


def entropy_logprobs_backward(
    x: torch.Tensor,
    targets: torch.Tensor | None,
    stats: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    grad_logprobs: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """dL/dx [N, V] in x's dtype from the upstream grads [N] (either may be None)."""
    n_rows, n_cols = x.shape
    grad = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return grad
    has_h = grad_entropy is not None
    has_lp = grad_logprobs is not None and targets is not None
    block, num_warps = _launch_config(n_cols)
    with device_guard(x):
        _entropy_logprobs_bwd_kernel[(n_rows,)](
            x,
            x.stride(0),
            grad,
            grad.stride(0),
            targets if has_lp else stats,  # placeholders are never read: their flag is False
            stats,
            grad_entropy.reshape(-1).float().contiguous() if has_h else stats,
            grad_logprobs.reshape(-1).float().contiguous() if has_lp else stats,
            n_cols,
            1.0 / temperature,
            HAS_GRAD_H=has_h,
            HAS_GRAD_LP=has_lp,
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return grad


class EntropyLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: saves the logits (no copy), the targets and three floats per row."""

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        x = _as_rows(logits)
        flat_targets = targets.reshape(-1).contiguous() if targets is not None else None
        entropy, logprobs, stats = entropy_logprobs_forward(x, flat_targets, temperature)
        ctx.save_for_backward(x, flat_targets, stats)
        ctx.temperature = temperature
        ctx.logits_shape = logits.shape
        # Unused outputs arrive as None, which lets the backward skip their term entirely.
        ctx.set_materialize_grads(False)
        lead = logits.shape[:-1]
        return entropy.view(lead), logprobs.view(lead) if logprobs is not None else None

    @staticmethod
    def backward(ctx, grad_entropy, grad_logprobs):
        if grad_entropy is None and grad_logprobs is None:
            return None, None, None
        x, targets, stats = ctx.saved_tensors
        grad = entropy_logprobs_backward(x, targets, stats, grad_entropy, grad_logprobs, ctx.temperature)
        return grad.view(ctx.logits_shape), None, None


def _entropy_logprobs_triton(logits, targets, temperature):
    return EntropyLogprobsFunction.apply(logits, targets, temperature)


def entropy_logprobs(
    logits: torch.Tensor, targets: torch.Tensor | None = None, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entropy of softmax(logits / temperature) and log-probs of `targets`.

    logits [..., V] any float dtype; targets [...] integer or None. Returns float32 `(entropy [...],
    logprobs [...] | None)`, both differentiable w.r.t. logits. NaN logits give NaN; -inf logits are
    masked entries. On the Triton path a target id outside [0, V) gives a NaN log-prob; the torch
    reference raises instead (an index error on CPU, a device-side assert on CUDA).
    """
    check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V > 0, got shape {tuple(logits.shape)}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if targets is not None:
        if (
            not isinstance(targets, torch.Tensor)
            or targets.is_floating_point()
            or targets.dtype == torch.bool
        ):
            raise ValueError("targets must be an integer tensor of token ids")
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"targets has shape {tuple(targets.shape)} but logits [..., V] needs "
                f"{tuple(logits.shape[:-1])}"
            )
        if targets.device != logits.device:
            raise ValueError(f"targets is on {targets.device} but logits is on {logits.device}")
        targets = targets.long()
    if use_triton(logits):
        return _entropy_logprobs_triton(logits, targets, float(temperature))
    return reference.entropy_logprobs(logits, targets, temperature=float(temperature))
