"""segment_rewards and sequence_scores: segment ends from entropy spikes, rewards on tokens.

Triton: one program per row walks the response in blocks; segment ends, counts and the
per-segment (normalized) rewards are computed on the device with no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reference
from ._checks import check_distribute, check_normalizer, check_rows, resolve_granularity
from ._dispatch import HAS_TRITON, device_guard, use_triton
from .reference import SegmentRewards

if HAS_TRITON:
    import triton
    import triton.language as tl

# Tokens a program holds per step. 1024 covers most responses in one block (a longer row loops,
# carrying the end count between blocks); tests lower it to exercise the carry with tiny rows.
BLOCK_T = 1024

_GRANULARITY_CODE = {"segment": 0, "token": 1, "bandit": 2}
_DISTRIBUTE_CODE = {"interpolate": 0, "repeat": 1, "end": 2}


if HAS_TRITON:

    @triton.jit
    def _row_span(M_ptr, stride_mt, EOS_ptr, T, BLOCK_T: tl.constexpr):
        """Response length L (the mask's sum; it is a prefix) and E = L - 1 - has_eos of one row."""
        L = tl.full([], 0, tl.int32)
        for start in range(0, T, BLOCK_T):
            offs = start + tl.arange(0, BLOCK_T)
            m = tl.load(M_ptr + offs * stride_mt, mask=offs < T, other=0)
            L += tl.sum(m.to(tl.int32), axis=0)
        E = L - 1 - tl.load(EOS_ptr).to(tl.int32)
        return L, E

    @triton.jit
    def _block_ends(offs, H_ptr, stride_ht, L, E, threshold, GRANULARITY: tl.constexpr):
        """Which positions `offs` end a segment (DESIGN.md §3.1); every end lies below L <= T."""
        if GRANULARITY == 2:
            is_end = offs == L - 1
        else:
            # A response that is only an EOS has E < 0 and one segment, the EOS itself.
            is_end = offs == tl.where(E >= 0, E, L - 1)
            if GRANULARITY == 1:
                is_end = is_end | (offs <= E)
            else:
                inside = offs < E
                h = tl.load(H_ptr + offs * stride_ht, mask=inside, other=0.0).to(tl.float32)
                # `threshold` is rounded down to float32 on the host, so this `>` is exact.
                is_end = is_end | (inside & (h > threshold))
        return is_end

    @triton.jit
    def _segment_rewards_kernel(
        RM_ptr,
        H_ptr,
        M_ptr,
        EOS_ptr,
        REWARDS_ptr,
        ENDS_ptr,
        NUM_ptr,
        END_POS_ptr,
        T,
        stride_rb,
        stride_rt,
        stride_hb,
        stride_ht,
        stride_mb,
        stride_mt,
        stride_eos,
        threshold,
        norm_a,
        norm_b,
        norm_c,
        norm_d,
        sigma_floor,
        GRANULARITY: tl.constexpr,
        DISTRIBUTE: tl.constexpr,
        NORMALIZE: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """One program per row. RM/H/M [B, T] strided; REWARDS f32, ENDS int8, END_POS int32 [B, T]
        contiguous; NUM int64 [B].

        Pass 1 finds the ends and lists their positions in END_POS (the k-th end at column k-1);
        K is then known, so pass 2 gives each token its segment k = 1 + #ends before it and reads
        e_k and e_{k-1} back from END_POS.
        """
        row = tl.program_id(0).to(tl.int64)
        RM_ptr += row * stride_rb
        H_ptr += row * stride_hb
        M_ptr += row * stride_mb
        REWARDS_ptr += row * T
        ENDS_ptr += row * T
        END_POS_ptr += row * T
        L, E = _row_span(M_ptr, stride_mt, EOS_ptr + row * stride_eos, T, BLOCK_T)

        num = tl.full([], 0, tl.int32)
        for start in range(0, T, BLOCK_T):
            offs = start + tl.arange(0, BLOCK_T)
            is_end = _block_ends(offs, H_ptr, stride_ht, L, E, threshold, GRANULARITY)
            tl.store(ENDS_ptr + offs, is_end.to(tl.int8), mask=offs < T)
            k = num + tl.cumsum(is_end.to(tl.int32), axis=0)  # 1-based index of each end
            tl.store(END_POS_ptr + k - 1, offs, mask=is_end)
            num += tl.sum(is_end.to(tl.int32), axis=0)
        # Pass 2 reads END_POS entries that other threads of this program wrote.
        tl.debug_barrier()

        safe_num = tl.maximum(num, 1).to(tl.float32)
        before = tl.full([], 0, tl.int32)
        for start in range(0, T, BLOCK_T):
            offs = start + tl.arange(0, BLOCK_T)
            is_end = _block_ends(offs, H_ptr, stride_ht, L, E, threshold, GRANULARITY)
            seg = before + tl.cumsum(is_end.to(tl.int32), axis=0) - is_end.to(tl.int32)  # k - 1
            covered = seg < num  # false past the last end: trailing EOS and padding
            seg_end = tl.load(END_POS_ptr + seg, mask=covered, other=0)
            raw = tl.load(RM_ptr + seg_end * stride_rt, mask=covered, other=0.0).to(tl.float32)
            value = raw
            if NORMALIZE:
                log_p = tl.log((seg + 1).to(tl.float32) / safe_num)
                sigma = tl.maximum(norm_b * log_p + norm_d, sigma_floor)
                value = (raw - (norm_a * log_p + norm_c)) / sigma
            if DISTRIBUTE == 0:
                prev_end = tl.load(END_POS_ptr + seg - 1, mask=covered & (seg > 0), other=-1)
                value = value / (seg_end - prev_end).to(tl.float32)
            if DISTRIBUTE == 2:
                covered = covered & is_end
            tl.store(REWARDS_ptr + offs, tl.where(covered, value, 0.0), mask=offs < T)
            before += tl.sum(is_end.to(tl.int32), axis=0)
        tl.store(NUM_ptr + row, num.to(tl.int64))

    @triton.jit
    def _sequence_scores_kernel(
        RM_ptr,
        H_ptr,
        M_ptr,
        EOS_ptr,
        SCORES_ptr,
        ENDS_ptr,
        NUM_ptr,
        T,
        stride_rb,
        stride_rt,
        stride_hb,
        stride_ht,
        stride_mb,
        stride_mt,
        stride_eos,
        threshold,
        GRANULARITY: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """One program per row. RM/H/M [B, T] strided; SCORES f32 [B]; ENDS int8 [B, T] contiguous
        (kept for the backward); NUM int64 [B]."""
        row = tl.program_id(0).to(tl.int64)
        RM_ptr += row * stride_rb
        H_ptr += row * stride_hb
        M_ptr += row * stride_mb
        ENDS_ptr += row * T
        L, E = _row_span(M_ptr, stride_mt, EOS_ptr + row * stride_eos, T, BLOCK_T)

        num = tl.full([], 0, tl.int32)
        total = tl.full([], 0.0, tl.float32)
        for start in range(0, T, BLOCK_T):
            offs = start + tl.arange(0, BLOCK_T)
            is_end = _block_ends(offs, H_ptr, stride_ht, L, E, threshold, GRANULARITY)
            tl.store(ENDS_ptr + offs, is_end.to(tl.int8), mask=offs < T)
            value = tl.load(RM_ptr + offs * stride_rt, mask=is_end, other=0.0).to(tl.float32)
            total += tl.sum(value, axis=0)
            num += tl.sum(is_end.to(tl.int32), axis=0)
        tl.store(SCORES_ptr + row, total / tl.maximum(num, 1).to(tl.float32))
        tl.store(NUM_ptr + row, num.to(tl.int64))


def _launch_args(entropy, mask, threshold, has_eos):
    """Block size and the row-level inputs both kernels share."""
    B, T = mask.shape
    block = min(BLOCK_T, max(16, triton.next_power_of_2(T)))
    if entropy.dtype == torch.float64:
        # The kernels compare in float32; float64 entropy is turned into exact 0/1 spikes first.
        entropy = (entropy > threshold).float()
        threshold = 0.5
    if has_eos is None:
        has_eos = torch.ones(B, dtype=torch.bool, device=mask.device)
    # bool tensors reach Triton as int8 views (same strides, no copy).
    return block, entropy, mask.view(torch.int8), has_eos.view(torch.int8), reference.float32_floor(threshold)


def _segment_rewards_triton(
    rm_values, entropy, mask, granularity, threshold, has_eos, normalizer, sigma_floor, distribute
) -> SegmentRewards:
    """Triton path of `segment_rewards`; arguments already checked and resolved."""
    B, T = mask.shape
    device = rm_values.device
    empty = torch.zeros if B == 0 or T == 0 else torch.empty  # the kernel writes every entry
    rewards = empty(B, T, dtype=torch.float32, device=device)
    ends = empty(B, T, dtype=torch.int8, device=device)
    num = empty(B, dtype=torch.int64, device=device)
    if B == 0 or T == 0:
        return SegmentRewards(rewards, ends.view(torch.bool), num)
    block, entropy, mask, has_eos, threshold = _launch_args(entropy, mask, threshold, has_eos)
    end_pos = torch.empty(B, T, dtype=torch.int32, device=device)
    if granularity == "bandit":
        distribute = "end"  # the single reward sits on the last token
    a, b, c, d = normalizer if normalizer is not None else (0.0, 0.0, 0.0, 1.0)
    with device_guard(rm_values):
        _segment_rewards_kernel[(B,)](
            rm_values,
            entropy,
            mask,
            has_eos,
            rewards,
            ends,
            num,
            end_pos,
            T,
            rm_values.stride(0),
            rm_values.stride(1),
            entropy.stride(0),
            entropy.stride(1),
            mask.stride(0),
            mask.stride(1),
            has_eos.stride(0),
            threshold,
            a,
            b,
            c,
            d,
            sigma_floor,
            GRANULARITY=_GRANULARITY_CODE[granularity],
            DISTRIBUTE=_DISTRIBUTE_CODE[distribute],
            NORMALIZE=normalizer is not None,
            BLOCK_T=block,
        )
    return SegmentRewards(rewards, ends.view(torch.bool), num)


class _SequenceScores(torch.autograd.Function):
    """Forward in Triton; backward in torch: d score / d rm_values = 1/K at each end, 0 elsewhere."""

    @staticmethod
    def forward(ctx, rm_values, entropy, mask, granularity, threshold, has_eos):
        B, T = mask.shape
        device = rm_values.device
        empty = torch.zeros if B == 0 or T == 0 else torch.empty  # the kernel writes every entry
        scores = empty(B, dtype=torch.float32, device=device)
        ends = empty(B, T, dtype=torch.int8, device=device)
        num = empty(B, dtype=torch.int64, device=device)
        if B > 0 and T > 0:
            block, entropy, mask, has_eos, threshold = _launch_args(entropy, mask, threshold, has_eos)
            with device_guard(rm_values):
                _sequence_scores_kernel[(B,)](
                    rm_values,
                    entropy,
                    mask,
                    has_eos,
                    scores,
                    ends,
                    num,
                    T,
                    rm_values.stride(0),
                    rm_values.stride(1),
                    entropy.stride(0),
                    entropy.stride(1),
                    mask.stride(0),
                    mask.stride(1),
                    has_eos.stride(0),
                    threshold,
                    GRANULARITY=_GRANULARITY_CODE[granularity],
                    BLOCK_T=block,
                )
        ctx.save_for_backward(ends.view(torch.bool), num)
        ctx.rm_dtype = rm_values.dtype
        return scores

    @staticmethod
    def backward(ctx, grad_scores):
        ends, num = ctx.saved_tensors
        per_end = grad_scores.float() / num.clamp(min=1).float()
        grad = torch.where(ends, per_end[:, None], torch.zeros((), device=ends.device))
        return grad.to(ctx.rm_dtype), None, None, None, None, None


def _sequence_scores_triton(rm_values, entropy, mask, granularity, threshold, has_eos) -> torch.Tensor:
    """Triton path of `sequence_scores`; arguments already checked and resolved."""
    return _SequenceScores.apply(rm_values, entropy, mask, granularity, threshold, has_eos)


def segment_rewards(
    rm_values: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    granularity: str = "segment",
    threshold: float = 2.0,
    has_eos: torch.Tensor | None = None,
    normalizer: Sequence[float] | torch.Tensor | None = None,
    sigma_floor: float = 1e-2,
    distribute: str = "interpolate",
) -> SegmentRewards:
    """Dense rewards `[B, T]` f32, segment ends `[B, T]` bool and counts `[B]` int64 (DESIGN.md §3.1, §3.4).

    rm_values, entropy [B, T] float; response_mask [B, T] bool (prefix); has_eos [B] bool or None
    (every row ends with EOS); normalizer [a, b, c, d] or None.
    """
    mask = check_rows(response_mask, has_eos, rm_values=rm_values, entropy=entropy)
    granularity = resolve_granularity(granularity, threshold)
    check_distribute(distribute)
    params = check_normalizer(normalizer, sigma_floor)
    has_eos = has_eos.bool() if has_eos is not None else None
    args = (granularity, float(threshold), has_eos, params, float(sigma_floor), distribute)
    if use_triton(rm_values):
        return _segment_rewards_triton(rm_values, entropy, mask, *args)
    return reference.segment_rewards(
        rm_values,
        entropy,
        mask,
        granularity=granularity,
        threshold=float(threshold),
        has_eos=has_eos,
        normalizer=params,
        sigma_floor=float(sigma_floor),
        distribute=distribute,
    )


def sequence_scores(
    rm_values: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    granularity: str,
    threshold: float,
    has_eos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of `rm_values` at segment ends, `[B]` float32, differentiable w.r.t. `rm_values`."""
    mask = check_rows(response_mask, has_eos, rm_values=rm_values, entropy=entropy)
    granularity = resolve_granularity(granularity, threshold)
    has_eos = has_eos.bool() if has_eos is not None else None
    if use_triton(rm_values):
        return _sequence_scores_triton(rm_values, entropy, mask, granularity, float(threshold), has_eos)
    return reference.sequence_scores(
        rm_values, entropy, mask, granularity=granularity, threshold=float(threshold), has_eos=has_eos
    )
