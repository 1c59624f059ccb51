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
LOG2E = 1.4426950408889634  # the kernels take scale = log2(e) / T (see below)


def _launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of `n_cols` entries."""
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)
    num_warps = 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1
    return block, num_warps


if HAS_TRITON:
    # Kernel constants are tl.constexpr: a jit function reads no other globals.
    # Exponentials are taken in base 2, 2^((x - m)·log2(e)/T): one exp2 (a single MUFU.EX2 on NVIDIA
    # GPUs; tl.exp adds a multiply and a subnormal fix-up) with log2 e folded into the scale. The max m
    # is subtracted before scaling, in the logits' own units, where x - m is exact for nearby values
    # (scaling first would round x·log2 e at the logits' magnitude: 1e-4 of entropy at |x| ~ 1e4).
    # Results are turned back to nats once per row.
    LN2 = tl.constexpr(0.6931471805599453)
    # A lane's running max before it has seen a finite logit: the lowest float32, so that it never
    # exceeds a real logit (not even torch.finfo(float32).min, a common mask value) and, unlike -inf,
    # rescaling by exp2((m_old - m_new)·scale) never meets -inf - (-inf).
    NEG_BIG = tl.constexpr(-3.4028234663852886e38)
    # Floor for base-2 exponents that multiply something: below it exp2 is exactly 0 in float32, so
    # clamping changes no result, but it keeps -inf (a masked entry, or the shift away from NEG_BIG)
    # out of products with 0, which would be NaN.
    FLOOR = tl.constexpr(-1000.0)

    @triton.jit
    def _fwd_block(X_ptr, cols, n_cols, scale, m, s, w, LANE_AXIS: tl.constexpr, MASKED: tl.constexpr):
        """One block of the forward's per-lane online softmax (see the kernel): new (m, s, w)."""
        if MASKED:
            x = tl.load(X_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        else:
            x = tl.load(X_ptr + cols).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=LANE_AXIS))
        shift = tl.maximum((m - m_new) * scale, FLOOR)  # <= 0; 0 while nothing finite was seen
        alpha = tl.exp2(shift)
        yc = (x - tl.expand_dims(m_new, LANE_AXIS)) * scale
        p = tl.exp2(yc)
        # A NaN logit makes p NaN, and s carries it to both outputs: no separate NaN check.
        w = alpha * (w + shift * s) + tl.sum(tl.maximum(yc, FLOOR) * p, axis=LANE_AXIS)
        s = alpha * s + tl.sum(p, axis=LANE_AXIS)
        return m_new, s, w

    @triton.jit
    def _bwd_block(
        X_ptr, G_ptr, cols, n_cols, scale, m, log2_s, a, b, HAS_GRAD_H: tl.constexpr, MASKED: tl.constexpr
    ):
        """One block of the backward: G = p·(a·u + b) (see the kernel)."""
        if MASKED:
            x = tl.load(X_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        else:
            x = tl.load(X_ptr + cols).to(tl.float32)
        u = (x - m) * scale - log2_s
        p = tl.exp2(u)
        if HAS_GRAD_H:
            # Masked entries: p = 0 and u = -inf; the floor keeps a·u finite, so 0·(a·u + b) = 0.
            grad = p * (a * tl.maximum(u, FLOOR) + b)
        else:
            grad = p * b
        if MASKED:
            tl.store(G_ptr + cols, grad.to(G_ptr.dtype.element_ty), mask=cols < n_cols)
        else:
            tl.store(G_ptr + cols, grad.to(G_ptr.dtype.element_ty))

    @triton.jit
    def _entropy_logprobs_fwd_kernel(
        X_ptr,
        X_stride,
        T_ptr,
        H_ptr,
        LP_ptr,
        STATS_ptr,
        n_cols,
        scale,
        inv_temp,
        HAS_TARGETS: tl.constexpr,
        BLOCK_V: tl.constexpr,
        TILE_C: tl.constexpr,
        LANE_AXIS: tl.constexpr,
    ):
        """One row, scale = log2 e / T, m = max x, y_i = (x_i - m)·scale: with s = Σ 2^y and
        w = Σ y·2^y, H = ln2·(log2 s - w/s) and log p = ln2·(y[target] - log2 s).

        X [N, V] (row stride X_stride, unit column stride), T [N] int64; H, LP [N] f32;
        STATS [N, 3] f32 receives (m, log2 s, H / ln2) for the backward.

        The block is a row-major [BLOCK_V / TILE_C, TILE_C] tile and each lane, a line of it along
        LANE_AXIS that one thread holds, keeps its own online softmax (m, s, w), so the loop has no
        reduction across threads at all; the lanes are merged once, after the loop. With 16-byte
        aligned rows a lane is TILE_C consecutive logits (one vector load, LANE_AXIS = 1);
        otherwise Triton loads one entry per thread, TILE_C is the CTA's thread count, and a lane
        is a column, each thread's entries 32·num_warps apart (LANE_AXIS = 0).
        """
        row = tl.program_id(0).to(tl.int64)  # int64: N·V passes 2^31 at 16k rows of a 128k vocab
        X_ptr += row * X_stride
        TILE_R: tl.constexpr = BLOCK_V // TILE_C
        offs = tl.arange(0, TILE_R)[:, None] * TILE_C + tl.arange(0, TILE_C)[None, :]

        # Running max of x per lane (reducing a constant tile gives the lanes' shape and layout).
        m = tl.max(tl.full([TILE_R, TILE_C], NEG_BIG, tl.float32), axis=LANE_AXIS)
        s = tl.zeros_like(m)  # Σ 2^((x - m)·scale)
        # Σ (x - m)·scale·2^((x - m)·scale): centred on the running max so that log2 s - w/s never
        # subtracts two numbers of the size of the logits (log Z - E[x] would cancel at |x| ~ 1e3).
        w = tl.zeros_like(m)
        # Full blocks without a mask (a per-entry bound check costs a compare and a predicate
        # register per entry where loads are not vectors); the partial last block with one.
        n_full = n_cols - n_cols % BLOCK_V
        for start in range(0, n_full, BLOCK_V):
            m, s, w = _fwd_block(X_ptr, start + offs, n_cols, scale, m, s, w, LANE_AXIS, False)
        if n_full < n_cols:
            m, s, w = _fwd_block(X_ptr, n_full + offs, n_cols, scale, m, s, w, LANE_AXIS, True)

        # Merge the lanes on the row max. A lane that saw only -inf has m = NEG_BIG and s = 0.
        m_row = tl.max(m, axis=0)
        d = tl.maximum((m - m_row) * scale, FLOOR)
        r = tl.exp2(d)
        s_row = tl.sum(r * s, axis=0)
        w_row = tl.sum(r * (w + d * s), axis=0)
        # A fully masked row has s = 0: log2 s = -inf, w/s = NaN, and both outputs come out NaN.
        log2_s = tl.log2(s_row)
        entropy2 = log2_s - w_row / s_row
        tl.store(H_ptr + row, entropy2 * LN2)
        # Stats stay relative to the max, so logZ is never rounded at the logits' scale.
        tl.store(STATS_ptr + 3 * row, m_row)
        tl.store(STATS_ptr + 3 * row + 1, log2_s)
        tl.store(STATS_ptr + 3 * row + 2, entropy2)
        if HAS_TARGETS:
            target = tl.load(T_ptr + row)
            valid = (target >= 0) & (target < n_cols)
            # An out-of-range id reads column 0 and reports NaN rather than reading out of bounds.
            x_t = tl.load(X_ptr + tl.where(valid, target, 0)).to(tl.float32)
            # In nats straight away: (x_t - m)·scale can overflow where (x_t - m)/T does not
            # (a target at torch.finfo(float32).min).
            logp = (x_t - m_row) * inv_temp - log2_s * LN2
            tl.store(LP_ptr + row, tl.where(valid, logp, float("nan")))

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
        scale,
        inv_temp,
        HAS_GRAD_H: tl.constexpr,
        HAS_GRAD_LP: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """dL/dlogits for one row. With u = (x - m)·scale - log2 s (so p = 2^u) and H in nats:

        dH/dx_i = -(ln2/T)·p_i·(u_i + H/ln2),  dlogp/dx_i = (δ(i, target) - p_i)/T,

        that is p·(a·u + b) + c·δ with per-row a = -g_H·ln2/T, b = (a·H/ln2 - g_logp/T), c = g_logp/T.
        The loop writes p·(a·u + b); the target's entry, the only one with the δ term, is rewritten
        after it, so no element pays for a comparison with the target id.
        X, G [N, V] (G in the logits' dtype); T, GH, GLP [N]; STATS [N, 3] from the forward.
        """
        row = tl.program_id(0).to(tl.int64)
        X_ptr += row * X_stride
        G_ptr += row * G_stride
        offs = tl.arange(0, BLOCK_V)
        m = tl.load(STATS_ptr + 3 * row)
        log2_s = tl.load(STATS_ptr + 3 * row + 1)
        a = 0.0
        b = 0.0
        if HAS_GRAD_H:
            a = -tl.load(GH_ptr + row) * (LN2 * inv_temp)
            b = a * tl.load(STATS_ptr + 3 * row + 2)
        if HAS_GRAD_LP:
            c = tl.load(GLP_ptr + row) * inv_temp
            b -= c
        n_full = n_cols - n_cols % BLOCK_V  # full blocks unmasked, as in the forward
        for start in range(0, n_full, BLOCK_V):
            _bwd_block(X_ptr, G_ptr, start + offs, n_cols, scale, m, log2_s, a, b, HAS_GRAD_H, False)
        if n_full < n_cols:
            _bwd_block(X_ptr, G_ptr, n_full + offs, n_cols, scale, m, log2_s, a, b, HAS_GRAD_H, True)
        if HAS_GRAD_LP:
            target = tl.load(T_ptr + row)
            if (target >= 0) & (target < n_cols):
                # The loop's store of this entry (by whichever thread held it) must land first.
                tl.debug_barrier()
                x_t = tl.load(X_ptr + target).to(tl.float32)
                u_t = (x_t - m) * scale - log2_s
                p_t = tl.exp2(u_t)
                if HAS_GRAD_H:
                    grad_t = p_t * (a * tl.maximum(u_t, FLOOR) + b) + c
                else:
                    grad_t = p_t * b + c
                tl.store(G_ptr + target, grad_t.to(G_ptr.dtype.element_ty))


def _lane_tile(x: torch.Tensor, block: int, num_warps: int) -> dict:
    """The forward's lane tile: 16 bytes per lane where Triton can prove the rows' alignment (it
    specialises on a pointer, stride or size being a multiple of 16), else one column per thread."""
    aligned = x.data_ptr() % 16 == 0 and x.stride(0) % 16 == 0 and x.shape[1] % 16 == 0
    if aligned:
        return {"TILE_C": min(block, 16 // x.element_size()), "LANE_AXIS": 1}
    return {"TILE_C": min(block, 32 * num_warps), "LANE_AXIS": 0}


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with unit column stride; a view whenever the layout allows one."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernels need unit column stride; rows may be strided
    return logits.reshape(-1, logits.shape[-1])


def entropy_logprobs_forward(x: torch.Tensor, targets: torch.Tensor | None, temperature: float):
    """x [N, V] any float dtype with unit column stride; targets [N] int64 or None.

    Returns float32 `(entropy [N], logprobs [N] | None, stats [N, 3])` of x / temperature, where
    stats holds, in base 2 (y = x·log2 e / temperature), (max y, log2 Σ 2^(y - max), entropy in
    bits) per row for the backward.
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
            LOG2E / temperature,
            1.0 / temperature,
            HAS_TARGETS=targets is not None,
            BLOCK_V=block,
            **_lane_tile(x, block, num_warps),
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
            LOG2E / temperature,
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
