"""linear_entropy_logprobs: entropy and target log-probs straight from hidden states and the LM head.

The logits `z = hidden·weightᵀ + bias` are never materialised: tokens and vocabulary are walked in
chunks, each chunk's logits are computed, folded into per-token running statistics (online
log-sum-exp: running max m, Σexp and Σ(x − m)·exp, as in `entropy_logprobs`' Triton kernel) and
dropped, so at most one chunk of logits (a few working buffers of `CHUNK_ELEMENTS`) exists at a
time. The backward recomputes each chunk's logits from the saved hidden states and the three saved
numbers per token, turns them into the chunk's logit gradient and multiplies it straight into the
gradients of `hidden` and `weight`.

Shapes: `N` tokens, `H` hidden size, `V` vocabulary entries.

    hidden  [N, H]   float dtype of the head (bf16/fp16/fp32/fp64)
    weight  [V, H]   the head's weight (tied or not)
    bias    [V]      optional
    targets [N]      int64 in [0, V), or None
    ->  entropy [N] float32, logprobs [N] float32 or None   (float64 for float64 inputs)

Each chunk's logits are computed in the head's dtype, as the unfused `lm_head` would compute them,
then converted to float32: the result equals `entropy_logprobs(F.linear(hidden, weight, bias))` to
float32 rounding, whatever the dtype.
"""

from __future__ import annotations

import torch

from ._checks import check_float
from .entropy import entropy_logprobs

# Logits per chunk (tokens × vocabulary). On CPU 2^21 float32 values is 8 MiB per working buffer:
# a chunk stays in cache and the per-chunk overhead is small; tests lower both to walk many chunks.
CHUNK_ELEMENTS = 1 << 21
# On CUDA fewer, larger products keep the GPU busy: 2^24 is ~170 MB of working buffers (bf16
# logits, float32 copy and exp), with the backward's float32 [N, H] accumulator still ≤ 1/8 of
# the bf16 logits at N = 16384, H = 4096, V = 128256.
CUDA_CHUNK_ELEMENTS = 1 << 24
# Vocabulary entries per chunk: the width of one `[tokens, VOCAB_CHUNK] @ [VOCAB_CHUNK, H]` product.
VOCAB_CHUNK = 8192


def linear_entropy_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unfused path: the whole `[N, V]` logits, then `entropy_logprobs`."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return entropy_logprobs(logits, targets, temperature=temperature)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_sizes(n_tokens: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(tokens, vocabulary entries) per chunk."""
    vocab_chunk = max(1, min(vocab, VOCAB_CHUNK))
    elements = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
    return max(1, min(n_tokens, elements // vocab_chunk)), vocab_chunk


def _chunk_logits(hidden, weight, bias, v0: int, v1: int, work: torch.dtype) -> torch.Tensor:
    """z [n, v1 − v0] in the work dtype, computed in the head's dtype like `lm_head` would."""
    z = hidden @ weight[v0:v1].T
    if bias is not None:
        z = z + bias[v0:v1]
    return z.to(work)


def _target_in_chunk(targets: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into the chunk [n, 1] clamped into range, whether the target lies in it [n])."""
    inside = (targets >= v0) & (targets < v1)
    return (targets - v0).clamp(0, v1 - v0 - 1)[:, None], inside


def _forward(hidden, weight, bias, targets, inv_temp: float):
    """Per token: (entropy, logprobs | None, row_max m, log Σexp((z − m)/T), E[(z − m)/T])."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    work = _work_dtype(hidden.dtype)
    token_chunk, vocab_chunk = _chunk_sizes(n_tokens, vocab, hidden.device)
    row_max = hidden.new_empty(n_tokens, dtype=work)
    sum_exp = hidden.new_empty(n_tokens, dtype=work)
    sum_xe = hidden.new_empty(n_tokens, dtype=work)  # Σ (z − m)/T · exp((z − m)/T)
    target_z = hidden.new_zeros(n_tokens, dtype=work) if targets is not None else None
    for n0 in range(0, n_tokens, token_chunk):
        n1 = min(n0 + token_chunk, n_tokens)
        h = hidden[n0:n1]
        m, s, w = row_max[n0:n1], sum_exp[n0:n1], sum_xe[n0:n1]
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            z = _chunk_logits(h, weight, bias, v0, v1, work)
            if targets is not None:
                index, inside = _target_in_chunk(targets[n0:n1], v0, v1)
                picked = z.gather(1, index).squeeze(1)
                target_z[n0:n1] = torch.where(inside, picked, target_z[n0:n1])
            chunk_max = z.amax(-1)
            new_max = chunk_max if v0 == 0 else torch.maximum(m, chunk_max)
            xc = z.sub_(new_max[:, None])  # (z − m_new)/T; z is spent
            if inv_temp != 1.0:
                xc.mul_(inv_temp)
            e = torch.exp(xc)
            chunk_s, chunk_w = e.sum(-1), xc.mul_(e).sum(-1)
            if v0 == 0:  # nothing to rescale yet (and m = −inf would make 0·inf below)
                m.copy_(new_max)
                s.copy_(chunk_s)
                w.copy_(chunk_w)
                continue
            # Move the running sums from the old max to the new one: with d = (m − m_new)/T ≤ 0,
            # Σexp scales by e^d and Σ(x − m_new)e^(x − m_new) = e^d·(Σ(x − m)e^(x − m) + d·Σexp).
            shift = (m - new_max).mul_(inv_temp)
            alpha = torch.exp(shift)
            w.add_(shift * s).mul_(alpha).add_(chunk_w)
            s.mul_(alpha).add_(chunk_s)
            m.copy_(new_max)
    log_s = sum_exp.log()
    mean_c = sum_xe / sum_exp  # E[x − m/T] under p
    entropy = (log_s - mean_c).float() if work == torch.float32 else log_s - mean_c
    logprobs = None
    if targets is not None:
        logprobs = (target_z - row_max).mul_(inv_temp).sub_(log_s)
    return entropy, logprobs, row_max, log_s, mean_c


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b; in place (no product-sized temporary) when the dtypes agree."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += a @ b


def _backward(hidden, weight, bias, targets, stats, grad_entropy, grad_logprobs, inv_temp, needs):
    """Gradients of (hidden, weight, bias), each None when not needed.

    With x = z/T, xc = x − m/T and p = softmax(x): dH/dx_i = −p_i (xc_i − E[xc]) and
    dlogp/dx_i = δ(i, target) − p_i, so dL/dz_i = p_i·(a·xc_i + b) + c·δ(i, target) with per-token
    a = −g_H/T, b = (g_H·E[xc] − g_lp)/T, c = g_lp/T.
    """
    row_max, log_s, mean_c = stats
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    work = row_max.dtype
    token_chunk, vocab_chunk = _chunk_sizes(n_tokens, vocab, hidden.device)
    a = torch.zeros_like(row_max)
    b = torch.zeros_like(row_max)
    c = None
    if grad_entropy is not None:
        g_h = grad_entropy.to(work)
        a, b = g_h * -inv_temp, g_h * mean_c * inv_temp
    if grad_logprobs is not None:
        c = grad_logprobs.to(work) * inv_temp
        b = b - c
    need_hidden, need_weight, need_bias = needs
    # Accumulated over vocabulary chunks in the work dtype, rounded to the head's dtype once.
    grad_hidden = torch.zeros_like(hidden, dtype=work) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty_like(bias) if need_bias else None
    direct = weight.dtype == work
    for v0 in range(0, vocab, vocab_chunk):  # vocabulary outer: each weight chunk's gradient is local
        v1 = min(v0 + vocab_chunk, vocab)
        w_chunk = weight[v0:v1]
        gw = None
        if need_weight:  # straight into the gradient when it is in the work dtype
            gw = grad_weight[v0:v1] if direct else w_chunk.new_empty(w_chunk.shape, dtype=work)
            gw.zero_()
        gb = torch.zeros(v1 - v0, dtype=work, device=weight.device) if need_bias else None
        for n0 in range(0, n_tokens, token_chunk):
            n1 = min(n0 + token_chunk, n_tokens)
            h = hidden[n0:n1]
            xc = _chunk_logits(h, weight, bias, v0, v1, work)
            xc.sub_(row_max[n0:n1, None])
            if inv_temp != 1.0:
                xc.mul_(inv_temp)
            p = torch.sub(xc, log_s[n0:n1, None]).exp_()
            g = xc.mul_(a[n0:n1, None]).add_(b[n0:n1, None]).mul_(p)  # dL/dz of the chunk
            del p
            if c is not None:
                index, inside = _target_in_chunk(targets[n0:n1], v0, v1)
                g.scatter_add_(1, index, torch.where(inside, c[n0:n1], 0.0)[:, None])
            g = g.to(hidden.dtype)  # the products run in the head's dtype, as in the unfused path
            if need_hidden:
                _accumulate_product(grad_hidden[n0:n1], g, w_chunk)
            if need_weight:
                _accumulate_product(gw, g.T, h)
            if need_bias:
                gb += g.sum(0)
        if need_weight and not direct:
            grad_weight[v0:v1] = gw
        if need_bias:
            grad_bias[v0:v1] = gb
    if need_hidden:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


class _LinearEntropyLogprobs(torch.autograd.Function):
    """Saves hidden, weight, bias (no copies), the targets and three numbers per token."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature):
        inv_temp = 1.0 / temperature
        entropy, logprobs, *stats = _forward(hidden, weight, bias, targets, inv_temp)
        ctx.save_for_backward(hidden, weight, bias, targets, *stats)
        ctx.inv_temp = inv_temp
        ctx.set_materialize_grads(False)  # an unused output's grad arrives as None and is skipped
        return entropy, logprobs

    @staticmethod
    def backward(ctx, grad_entropy, grad_logprobs):
        hidden, weight, bias, targets, *stats = ctx.saved_tensors
        if targets is None:
            grad_logprobs = None
        needs = ctx.needs_input_grad[:3]
        if (grad_entropy is None and grad_logprobs is None) or not any(needs):
            return None, None, None, None, None
        grads = _backward(
            hidden, weight, bias, targets, stats, grad_entropy, grad_logprobs, ctx.inv_temp, needs
        )
        return *grads, None, None


def _check(hidden, weight, targets, bias, temperature) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, {weight.device}) "
            "must share dtype and device"
        )
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}] of {weight.dtype}, got {tuple(bias.shape)}")
    if targets is not None:
        if targets.shape != hidden.shape[:1] or targets.is_floating_point():
            raise ValueError(f"targets must be integer [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
        if targets.device != hidden.device:
            raise ValueError(f"targets are on {targets.device} but hidden is on {hidden.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def linear_entropy_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entropy of softmax((hidden·weightᵀ + bias)/temperature) and log-probs of `targets`, `[N]` each.

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] int in [0, V) or None. Float32
    outputs (float64 for float64 inputs), differentiable w.r.t. hidden, weight and bias; never holds
    more than one chunk of logits. NaN in the inputs gives NaN. A target outside [0, V) is an error
    (checked on the device, without a host synchronisation).
    """
    _check(hidden, weight, targets, bias, temperature)
    if targets is not None:
        targets = targets.long()
        in_range = ((targets >= 0) & (targets < weight.shape[0])).all()
        torch._assert_async(in_range, "linear_entropy_logprobs: targets must lie in [0, V)")
    return _LinearEntropyLogprobs.apply(hidden, weight, bias, targets, float(temperature))
