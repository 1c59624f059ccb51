"""gae: generalized advantage estimation over response tokens.

Triton: one program per row runs the reverse recurrence in blocks, each block a reverse
associative scan of (decay, value) pairs with the carry from the block after it.
"""

from __future__ import annotations

import math

import torch

from . import reference
from ._checks import check_rows
from ._dispatch import HAS_TRITON, device_guard, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

# Tokens a program holds per step. 1024 covers most responses in one block (a longer row loops,
# carrying one float between blocks); tests lower it to exercise the carry with tiny rows.
BLOCK_T = 1024


if HAS_TRITON:

    @triton.jit
    def _affine_combine(a_later, b_later, a_here, b_here):
        """Compose x -> a_here·x + b_here after the later suffix's map x -> a_later·x + b_later.

        In a reverse scan Triton passes the accumulated suffix first, the current element second.
        """
        return a_here * a_later, b_here + a_here * b_later

    @triton.jit
    def _gae_kernel(
        R_ptr,
        V_ptr,
        M_ptr,
        ADV_ptr,
        RET_ptr,
        T,
        stride_rb,
        stride_rt,
        stride_vb,
        stride_vt,
        stride_mb,
        stride_mt,
        gamma,
        decay,
        BLOCK_T: tl.constexpr,
    ):
        """One row: A_t = δ_t + γλ·A_{t+1}, δ_t = r_t + γ·V_{t+1} − V_t over masked r, V.

        R, V [B, T] any float dtype, M [B, T] bool (any strides); ADV, RET [B, T] f32 contiguous.
        """
        row = tl.program_id(0).to(tl.int64)  # int64: row · stride can pass 2^31 for large B·T
        R_ptr += row * stride_rb
        V_ptr += row * stride_vb
        M_ptr += row * stride_mb
        ADV_ptr += row * T
        RET_ptr += row * T
        local = tl.arange(0, BLOCK_T)

        carry = 0.0  # A at the first token of the block after the current one
        n_blocks = tl.cdiv(T, BLOCK_T)
        for i in range(n_blocks):
            offs = (n_blocks - 1 - i) * BLOCK_T + local
            inside = offs < T
            nxt = offs + 1
            # Loads masked by the response mask: padding is never read, so whatever garbage
            # (even NaN/inf) sits there cannot leak in, and its memory traffic is skipped.
            m = tl.load(M_ptr + offs * stride_mt, mask=inside, other=0) != 0
            r = tl.load(R_ptr + offs * stride_rt, mask=m, other=0.0).to(tl.float32)
            v = tl.load(V_ptr + offs * stride_vt, mask=m, other=0.0).to(tl.float32)
            # V_{t+1} is re-read (a cache hit) rather than shifted in registers; 0 past the response.
            m_next = tl.load(M_ptr + nxt * stride_mt, mask=nxt < T, other=0) != 0
            v_next = tl.load(V_ptr + nxt * stride_vt, mask=m_next, other=0.0).to(tl.float32)
            delta = r + gamma * v_next - v
            # Each token is the map x -> decay·x + δ_t; the reverse scan composes the maps from t to
            # the block's end, so A_t = prod_t·carry + acc_t. prod_t = decay^(n ≤ BLOCK_T) ≤ 1:
            # no (γλ)^-t rescaling, nothing to overflow however long the row.
            prod, acc = tl.associative_scan(
                (tl.full((BLOCK_T,), 1.0, tl.float32) * decay, delta), 0, _affine_combine, reverse=True
            )
            adv = acc + prod * carry
            carry = tl.sum(tl.where(local == 0, adv, 0.0), axis=0)
            adv = tl.where(m, adv, 0.0)
            tl.store(ADV_ptr + offs, adv, mask=inside)
            tl.store(RET_ptr + offs, adv + v, mask=inside)


def _gae_triton(rewards, values, mask, gamma, lam):
    """Launch one program per row; inputs keep their dtype and strides (no copies)."""
    B, T = mask.shape
    adv = torch.empty(B, T, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if B == 0 or T == 0:
        return adv, ret
    # At least 16 lanes so short rows avoid degenerate 1-element tensors; BLOCK_T still caps it.
    block = min(BLOCK_T, max(16, triton.next_power_of_2(T)))
    with device_guard(rewards):
        _gae_kernel[(B,)](
            rewards,
            values,
            mask,
            adv,
            ret,
            T,
            rewards.stride(0),
            rewards.stride(1),
            values.stride(0),
            values.stride(1),
            mask.stride(0),
            mask.stride(1),
            gamma,
            gamma * lam,
            BLOCK_T=block,
            num_warps=4 if block >= 512 else 2 if block >= 128 else 1,
        )
    return adv, ret


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, float32 `[B, T]`, 0 outside the response (DESIGN.md §3.5).

    rewards, values [B, T] float; response_mask [B, T] bool (prefix). Not differentiable.
    """
    mask = check_rows(response_mask, rewards=rewards, values=values)
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not (isinstance(x, (int, float)) and math.isfinite(x) and 0 <= x <= 1):
            raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")
    with torch.no_grad():
        if use_triton(rewards):
            return _gae_triton(rewards, values, mask, float(gamma), float(lam))
        return reference.gae(rewards, values, mask, gamma=float(gamma), lam=float(lam))
