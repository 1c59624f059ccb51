"""segment_rewards and sequence_scores against a float64 loop that follows DESIGN.md §3.1/§3.3/§3.4.

Every test that takes `kernel_path` runs once on the torch reference and once on Triton (interpreted
on CPU). `small_blocks` makes the Triton kernels walk rows of a few dozen tokens in several blocks.
"""

from __future__ import annotations

import math

import pytest
import segppo.kernels.rewards as segments_module
import torch

from segppo.kernels import segment_rewards, sequence_scores

GRANULARITIES = ("segment", "token", "bandit")
DISTRIBUTES = ("interpolate", "repeat", "end")
# σ = b ln p + d stays above 1 for p <= 1 with the first; the second goes negative early in a
# response (p < e^(-1/2) with σ_floor = 0.1), so the floor decides σ there.
NORMALIZERS = {
    "none": None,
    "plain": (0.3, -0.2, 0.1, 1.0),
    "floored": (0.5, 0.4, -0.2, 0.3),
}
SIGMA_FLOOR = 0.1
# Entropy values come from a small grid so that thresholds can equal some of them exactly.
ENTROPY_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
THRESHOLDS = (2.0, math.nextafter(2.0, -math.inf), math.nextafter(2.0, math.inf), 0.75, 1e-30)
SHAPES = ((1, 1), (3, 1), (3, 2), (4, 13), (6, 37))
TOL = {"rtol": 1e-5, "atol": 1e-5}


# --------------------------------------------------------------------------------------------
# The oracle: §3.1, §3.3 and §3.4 written as plain loops in float64.


def oracle_ends(entropy, lengths, has_eos, granularity, threshold):
    """Per row, the list of end positions (ascending)."""
    rows = []
    for b, L in enumerate(lengths):
        if L == 0:
            rows.append([])
            continue
        if granularity == "bandit":
            rows.append([L - 1])
            continue
        E = L - 1 - (1 if has_eos[b] else 0)
        if E < 0:
            rows.append([L - 1])
        elif granularity == "token":
            rows.append(list(range(E + 1)))
        else:
            rows.append([t for t in range(E) if entropy[b][t] > threshold] + [E])
    return rows


def oracle_rewards(
    rm, entropy, lengths, has_eos, granularity, threshold, normalizer, sigma_floor, distribute
):
    """(rewards [B][T] floats, ends [B][T] bools, K per row) for lists of float64 values."""
    T = len(rm[0]) if rm else 0
    ends = oracle_ends(entropy, lengths, has_eos, granularity, threshold)
    rewards = [[0.0] * T for _ in rm]
    for b, row_ends in enumerate(ends):
        K = len(row_ends)
        start = 0
        for k, e in enumerate(row_ends, start=1):
            r = rm[b][e]
            if normalizer is not None:
                a, bb, c, d = normalizer
                p = k / K
                mu = a * math.log(p) + c
                sigma = max(bb * math.log(p) + d, sigma_floor)
                n = (r - mu) / sigma
            else:
                n = r
            span = range(start, e + 1)
            if granularity == "bandit" or distribute == "end":
                rewards[b][e] = n
            elif distribute == "repeat":
                for t in span:
                    rewards[b][t] = n
            else:
                for t in span:
                    rewards[b][t] = n / len(span)
            start = e + 1
    end_mask = [[t in row_ends for t in range(T)] for row_ends in ends]
    return rewards, end_mask, [len(row_ends) for row_ends in ends]


def oracle_scores(rm, entropy, lengths, has_eos, granularity, threshold):
    ends = oracle_ends(entropy, lengths, has_eos, granularity, threshold)
    return [sum(rm[b][e] for e in row) / len(row) if row else 0.0 for b, row in enumerate(ends)]


# --------------------------------------------------------------------------------------------
# Inputs.


def make_batch(B, T, seed, *, rm_dtype=torch.float32, entropy_dtype=torch.float32, eos="mixed"):
    """Rows 0, 1, 2 have L = T, 1 (an EOS only) and 0; further rows a random length.

    eos "mixed" draws has_eos per row (row 1 always True); "none" passes has_eos=None.
    """
    g = torch.Generator().manual_seed(seed)
    rm = torch.randn(B, T, generator=g).to(rm_dtype)
    grid = torch.tensor(ENTROPY_GRID)
    entropy = grid[torch.randint(len(ENTROPY_GRID), (B, T), generator=g)].to(entropy_dtype)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[:3] = torch.tensor([T, 1, 0])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if eos == "none":
        return rm, entropy, mask, None
    has_eos = torch.rand(B, generator=g) < 0.5
    has_eos[1:2] = True
    return rm, entropy, mask, has_eos


def as_lists(rm, entropy, mask, has_eos):
    lengths = [int(x) for x in mask.sum(-1)]
    eos = [True] * len(lengths) if has_eos is None else [bool(x) for x in has_eos]
    return rm.double().tolist(), entropy.double().tolist(), lengths, eos


def check_against_oracle(
    device,
    rm,
    entropy,
    mask,
    has_eos,
    *,
    granularity,
    threshold=2.0,
    normalizer=None,
    sigma_floor=SIGMA_FLOOR,
    distribute="interpolate",
):
    rm_l, ent_l, lengths, eos = as_lists(rm, entropy, mask, has_eos)
    want_rewards, want_ends, want_num = oracle_rewards(
        rm_l, ent_l, lengths, eos, granularity, threshold, normalizer, sigma_floor, distribute
    )
    out = segment_rewards(
        rm.to(device),
        entropy.to(device),
        mask.to(device),
        granularity=granularity,
        threshold=threshold,
        has_eos=None if has_eos is None else has_eos.to(device),
        normalizer=normalizer,
        sigma_floor=sigma_floor,
        distribute=distribute,
    )
    B, T = mask.shape
    assert out.rewards.dtype == torch.float32 and out.rewards.shape == (B, T)
    assert out.ends.dtype == torch.bool and out.ends.shape == (B, T)
    assert out.num_segments.dtype == torch.int64 and out.num_segments.shape == (B,)
    assert out.ends.cpu().tolist() == want_ends
    assert out.num_segments.cpu().tolist() == want_num
    torch.testing.assert_close(
        out.rewards.cpu().double(), torch.tensor(want_rewards, dtype=torch.float64).reshape(B, T), **TOL
    )
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 8 tokens, so rows of up to 37 tokens take several blocks and a partial last one."""
    monkeypatch.setattr(segments_module, "BLOCK_T", 8)


# --------------------------------------------------------------------------------------------
# Random inputs against the oracle.


@pytest.mark.parametrize("normalizer", list(NORMALIZERS))
@pytest.mark.parametrize("distribute", DISTRIBUTES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_segment_rewards_random(kernel_path, small_blocks, device, granularity, distribute, normalizer):
    thresholds = THRESHOLDS[:2] if granularity == "segment" else (2.0,)
    for i, (B, T) in enumerate(SHAPES):
        eos = ("mixed", "none")[i % 2]
        rm, entropy, mask, has_eos = make_batch(B, T, seed=100 * i, eos=eos)
        for threshold in thresholds:
            check_against_oracle(
                device,
                rm,
                entropy,
                mask,
                has_eos,
                granularity=granularity,
                threshold=threshold,
                normalizer=NORMALIZERS[normalizer],
                distribute=distribute,
            )


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_thresholds(kernel_path, small_blocks, device, threshold):
    """Strictness: thresholds equal to entropy values, one ulp either side, and tiny ones."""
    for i, (B, T) in enumerate(SHAPES):
        for eos in ("mixed", "none"):
            rm, entropy, mask, has_eos = make_batch(B, T, seed=7 * i + len(eos), eos=eos)
            check_against_oracle(
                device,
                rm,
                entropy,
                mask,
                has_eos,
                granularity="segment",
                threshold=threshold,
                normalizer=NORMALIZERS["floored"],
            )


def test_floored_normalizer_hits_the_floor():
    """The "floored" normalizer really exercises σ_floor for the shapes tested above."""
    a, b, c, d = NORMALIZERS["floored"]
    assert b * math.log(1 / 37) + d < SIGMA_FLOOR < b * math.log(1.0) + d


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_default_block_size(kernel_path, device, granularity):
    """The module's own block size, with a row longer than one small block."""
    rm, entropy, mask, has_eos = make_batch(5, 37, seed=7)
    check_against_oracle(
        device, rm, entropy, mask, has_eos, granularity=granularity, normalizer=NORMALIZERS["plain"]
    )
    want = oracle_scores(*as_lists(rm, entropy, mask, has_eos), granularity, 2.0)
    got = sequence_scores(
        rm.to(device),
        entropy.to(device),
        mask.to(device),
        granularity=granularity,
        threshold=2.0,
        has_eos=has_eos.to(device),
    )
    torch.testing.assert_close(got.cpu().double(), torch.tensor(want, dtype=torch.float64), **TOL)


@pytest.mark.parametrize("distribute", DISTRIBUTES)
def test_half_precision_inputs(kernel_path, small_blocks, device, distribute):
    """bf16/fp16 RM values and entropy: ends and rewards as if computed on the upcast values."""
    for rm_dtype, ent_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        rm, entropy, mask, has_eos = make_batch(4, 21, seed=3, rm_dtype=rm_dtype, entropy_dtype=ent_dtype)
        for normalizer in (None, NORMALIZERS["floored"]):
            check_against_oracle(
                device,
                rm,
                entropy,
                mask,
                has_eos,
                granularity="segment",
                normalizer=normalizer,
                distribute=distribute,
            )


def test_strict_threshold_in_low_precision(kernel_path, device):
    """2.015625 is the bf16 after 2.0; 2.01 lies between them (nearer the former), so it is a spike.

    Comparing a bf16 tensor with a Python float rounds the float to bf16 first (2.01 -> 2.015625),
    which would make it a tie.
    """
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        entropy = torch.tensor([[2.015625, 2.0, 2.015625, 0.0]], dtype=dtype)
        rm = torch.arange(4, dtype=torch.float32)[None]
        mask = torch.ones(1, 4, dtype=torch.bool)
        for threshold, want in (
            (2.01, [1, 0, 1, 1]),
            (2.015625, [0, 0, 0, 1]),
            (2.0, [1, 0, 1, 1]),
            (math.nextafter(2.0, -math.inf), [1, 1, 1, 1]),
        ):
            out = segment_rewards(
                rm.to(device),
                entropy.to(device),
                mask.to(device),
                threshold=threshold,
                has_eos=torch.tensor([False], device=device),
            )
            assert out.ends.cpu().int().tolist() == [want], (dtype, threshold)


def test_sentinel_thresholds(kernel_path, small_blocks, device):
    """The paper's CLI values: segment with threshold 0 is token-level, with 1000 it is bandit."""
    rm, entropy, mask, has_eos = make_batch(6, 37, seed=11)
    entropy = entropy + 2000.0  # would be spikes everywhere if 1000 were a real threshold
    for distribute in DISTRIBUTES:
        for threshold, same_as in ((0.0, "token"), (1000.0, "bandit")):
            out = check_against_oracle(
                device,
                rm,
                entropy,
                mask,
                has_eos,
                granularity=same_as,
                threshold=threshold,
                distribute=distribute,
            )
            seg = segment_rewards(
                rm.to(device),
                entropy.to(device),
                mask.to(device),
                granularity="segment",
                threshold=threshold,
                has_eos=has_eos.to(device),
                distribute=distribute,
            )
            for got, want in zip(seg, out, strict=True):
                assert torch.equal(got, want)


def test_non_contiguous_and_other_dtypes(kernel_path, small_blocks, device):
    """Strided views, float64 inputs, an integer mask and an integer has_eos column."""
    rm, entropy, mask, has_eos = make_batch(
        5, 23, seed=5, rm_dtype=torch.float64, entropy_dtype=torch.float64
    )
    rm_t = rm.t().contiguous().t()  # column-major
    ent_wide = torch.stack([entropy, entropy + 1], dim=-1)[..., 0]  # stride 2 along T
    mask_int = mask.long()
    eos_col = torch.stack([has_eos, ~has_eos], dim=1)[:, 0]  # stride 2
    assert not rm_t.is_contiguous() and not ent_wide.is_contiguous() and not eos_col.is_contiguous()
    rm_l, ent_l, lengths, eos = as_lists(rm, entropy, mask, has_eos)
    for normalizer in (None, NORMALIZERS["floored"]):
        want, _, _ = oracle_rewards(
            rm_l, ent_l, lengths, eos, "segment", 1.5, normalizer, SIGMA_FLOOR, "interpolate"
        )
        out = segment_rewards(
            rm_t.to(device),
            ent_wide.to(device),
            mask_int.to(device),
            threshold=1.5,
            has_eos=eos_col.to(device),
            normalizer=normalizer,
            sigma_floor=SIGMA_FLOOR,
        )
        torch.testing.assert_close(out.rewards.cpu().double(), torch.tensor(want, dtype=torch.float64), **TOL)
    scores = sequence_scores(
        rm_t.to(device),
        ent_wide.to(device),
        mask_int.to(device),
        granularity="segment",
        threshold=1.5,
        has_eos=eos_col.long().to(device),
    )
    want = oracle_scores(rm_l, ent_l, lengths, eos, "segment", 1.5)
    torch.testing.assert_close(scores.cpu().double(), torch.tensor(want, dtype=torch.float64), **TOL)


def test_empty_shapes(kernel_path, device):
    for B, T in ((0, 5), (3, 0), (0, 0)):
        rm = torch.zeros(B, T, device=device)
        mask = torch.zeros(B, T, dtype=torch.bool, device=device)
        out = segment_rewards(rm, rm, mask)
        assert out.rewards.shape == (B, T) and out.ends.shape == (B, T) and out.num_segments.shape == (B,)
        assert out.num_segments.dtype == torch.int64 and not out.ends.any()
        assert sequence_scores(rm, rm, mask, granularity="segment", threshold=2.0).shape == (B,)


# --------------------------------------------------------------------------------------------
# Hand-computed examples.
#
# Row 0: L = 5 with an EOS, so E = 3. Entropy > 2 strictly at t = 1 (3.0) but not at t = 2 (2.0);
#   ends {1, 3}: segments 0..1 (r = 20) and 2..3 (r = 40); the EOS at t = 4 and padding get 0.
# Row 1: the same tokens without an EOS: E = 4, spikes at t = 1 and t = 3 (5.0): ends {1, 3, 4}.
# Row 2: only an EOS (L = 1): one segment, the EOS itself.
# Row 3: empty.
HAND_RM = [[10.0, 20.0, 30.0, 40.0, 50.0, 60.0]] * 4
HAND_ENTROPY = [[0.1, 3.0, 2.0, 5.0, 9.0, 9.0]] * 4
HAND_LENGTHS = [5, 5, 1, 0]
HAND_EOS = [True, False, True, True]
LN2 = math.log(2.0)
LN3 = math.log(3.0)
LN23 = math.log(2.0 / 3.0)
HAND_CASES = [
    (
        "segment",
        "interpolate",
        None,
        [[1, 3], [1, 3, 4], [0], []],
        [[10, 10, 20, 20, 0, 0], [10, 10, 20, 20, 50, 0], [10, 0, 0, 0, 0, 0], [0] * 6],
    ),
    (
        "segment",
        "repeat",
        None,
        None,
        [[20, 20, 40, 40, 0, 0], [20, 20, 40, 40, 50, 0], [10, 0, 0, 0, 0, 0], [0] * 6],
    ),
    (
        "segment",
        "end",
        None,
        None,
        [[0, 20, 0, 40, 0, 0], [0, 20, 0, 40, 50, 0], [10, 0, 0, 0, 0, 0], [0] * 6],
    ),
    # μ = ln p, σ = 2: segment k of K gets (r_k - ln(k/K)) / 2.
    (
        "segment",
        "end",
        (1.0, 0.0, 0.0, 2.0),
        None,
        [
            [0, (20 + LN2) / 2, 0, 20, 0, 0],
            [0, (20 + LN3) / 2, 0, (40 - LN23) / 2, 25, 0],
            [5, 0, 0, 0, 0, 0],
            [0] * 6,
        ],
    ),
    (
        "token",
        "interpolate",
        None,
        [[0, 1, 2, 3], [0, 1, 2, 3, 4], [0], []],
        [[10, 20, 30, 40, 0, 0], [10, 20, 30, 40, 50, 0], [10, 0, 0, 0, 0, 0], [0] * 6],
    ),
    # Bandit: one reward at L - 1, whatever `distribute` says.
    (
        "bandit",
        "interpolate",
        None,
        [[4], [4], [0], []],
        [[0, 0, 0, 0, 50, 0], [0, 0, 0, 0, 50, 0], [10, 0, 0, 0, 0, 0], [0] * 6],
    ),
    # K = 1, p = 1: μ = c = 5 and σ = max(d, floor) = max(-1, 0.5); (50 - 5) / 0.5 = 90.
    (
        "bandit",
        "repeat",
        (3.0, 7.0, 5.0, -1.0),
        None,
        [[0, 0, 0, 0, 90, 0], [0, 0, 0, 0, 90, 0], [10, 0, 0, 0, 0, 0], [0] * 6],
    ),
]


@pytest.mark.parametrize("granularity,distribute,normalizer,ends,rewards", HAND_CASES)
def test_hand_examples(kernel_path, device, granularity, distribute, normalizer, ends, rewards):
    mask = torch.tensor([[t < L for t in range(6)] for L in HAND_LENGTHS], device=device)
    out = segment_rewards(
        torch.tensor(HAND_RM, device=device),
        torch.tensor(HAND_ENTROPY, device=device),
        mask,
        granularity=granularity,
        threshold=2.0,
        has_eos=torch.tensor(HAND_EOS, device=device),
        normalizer=normalizer,
        sigma_floor=0.5,
        distribute=distribute,
    )
    if ends is not None:
        assert [torch.nonzero(row).flatten().tolist() for row in out.ends.cpu()] == ends
        assert out.num_segments.cpu().tolist() == [len(row) for row in ends]
    torch.testing.assert_close(out.rewards.cpu().double(), torch.tensor(rewards, dtype=torch.float64), **TOL)


def test_hand_scores(kernel_path, device):
    mask = torch.tensor([[t < L for t in range(6)] for L in HAND_LENGTHS], device=device)
    args = (torch.tensor(HAND_ENTROPY, device=device), mask)
    kwargs = {"has_eos": torch.tensor(HAND_EOS, device=device)}
    rm = torch.tensor(HAND_RM, device=device, requires_grad=True)
    scores = sequence_scores(rm, *args, granularity="segment", threshold=2.0, **kwargs)
    assert scores.cpu().tolist() == pytest.approx([30.0, 110.0 / 3, 10.0, 0.0])
    scores.sum().backward()
    third = 1.0 / 3
    torch.testing.assert_close(
        rm.grad.cpu(),
        torch.tensor(
            [
                [0, 0.5, 0, 0.5, 0, 0],
                [0, third, 0, third, third, 0],
                [1, 0, 0, 0, 0, 0],
                [0] * 6,
            ]
        ),
    )
    bandit = sequence_scores(rm.detach(), *args, granularity="bandit", threshold=2.0, **kwargs)
    assert bandit.cpu().tolist() == [50.0, 50.0, 10.0, 0.0]


# --------------------------------------------------------------------------------------------
# sequence_scores: values and gradients against the oracle.


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_sequence_scores_random(kernel_path, small_blocks, device, granularity):
    thresholds = (2.0, math.nextafter(2.0, -math.inf), 0.75) if granularity == "segment" else (2.0,)
    for i, (B, T) in enumerate(SHAPES):
        for rm_dtype in (torch.float32, torch.bfloat16):
            rm, entropy, mask, has_eos = make_batch(B, T, seed=10 * i, rm_dtype=rm_dtype)
            rm_l, ent_l, lengths, eos = as_lists(rm, entropy, mask, has_eos)
            for threshold in thresholds:
                ends = oracle_ends(ent_l, lengths, eos, granularity, threshold)
                # The oracle's gradient: autograd through the float64 mean over each row's ends.
                rm64 = torch.tensor(rm_l, dtype=torch.float64, requires_grad=True).reshape(B, T)
                want = torch.stack(
                    [rm64[b, row].mean() if row else rm64.new_zeros(()) for b, row in enumerate(ends)]
                )
                weights = torch.randn(B, dtype=torch.float64)
                (want_grad,) = torch.autograd.grad((want * weights).sum(), rm64)

                leaf = rm.to(device).clone().requires_grad_(True)
                got = sequence_scores(
                    leaf,
                    entropy.to(device),
                    mask.to(device),
                    granularity=granularity,
                    threshold=threshold,
                    has_eos=has_eos.to(device),
                )
                assert got.dtype == torch.float32 and got.shape == (B,)
                torch.testing.assert_close(got.detach().cpu().double(), want.detach(), **TOL)
                (got * weights.float().to(device)).sum().backward()
                assert leaf.grad.dtype == rm_dtype
                grad_tol = TOL if rm_dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
                torch.testing.assert_close(leaf.grad.cpu().double(), want_grad, **grad_tol)


# --------------------------------------------------------------------------------------------
# Argument errors: a ValueError that names the argument.


def _valid():
    rm = torch.randn(2, 5)
    return {"rm_values": rm, "entropy": torch.rand(2, 5), "response_mask": torch.ones(2, 5, dtype=torch.bool)}


@pytest.mark.parametrize(
    "change,name",
    [
        ({"rm_values": torch.randn(2, 4)}, "rm_values"),
        ({"entropy": torch.rand(3, 5)}, "entropy"),
        ({"response_mask": torch.ones(2, 5, 1, dtype=torch.bool)}, "response_mask"),
        ({"rm_values": torch.ones(2, 5, dtype=torch.long)}, "rm_values"),
        ({"entropy": torch.ones(2, 5, dtype=torch.int32)}, "entropy"),
        ({"response_mask": torch.ones(2, 5)}, "response_mask"),
        ({"has_eos": torch.ones(3, dtype=torch.bool)}, "has_eos"),
        ({"has_eos": torch.ones(2, 1, dtype=torch.bool)}, "has_eos"),
        ({"granularity": "sentence"}, "granularity"),
        ({"threshold": -0.5}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
    ],
)
@pytest.mark.parametrize("op", ["segment_rewards", "sequence_scores"])
def test_argument_errors(op, change, name):
    kwargs = {"granularity": "segment", "threshold": 2.0, **_valid(), **change}
    fn = segment_rewards if op == "segment_rewards" else sequence_scores
    with pytest.raises(ValueError, match=name):
        fn(kwargs.pop("rm_values"), kwargs.pop("entropy"), kwargs.pop("response_mask"), **kwargs)


@pytest.mark.parametrize(
    "change,name",
    [
        ({"distribute": "spread"}, "distribute"),
        ({"normalizer": [1.0, 2.0, 3.0]}, "normalizer"),
        ({"normalizer": torch.zeros(5)}, "normalizer"),
        ({"normalizer": [0.0, 0.0, float("inf"), 1.0]}, "normalizer"),
        ({"sigma_floor": 0.0}, "sigma_floor"),
        ({"sigma_floor": -1e-2}, "sigma_floor"),
    ],
)
def test_segment_rewards_option_errors(change, name):
    v = _valid()
    with pytest.raises(ValueError, match=name):
        segment_rewards(v["rm_values"], v["entropy"], v["response_mask"], **change)


# --------------------------------------------------------------------------------------------
# On a GPU: a realistic batch against the reference and, for a few rows, the oracle.


@pytest.mark.gpu
def test_gpu_large_batch(monkeypatch):
    B, T = 512, 2048
    g = torch.Generator().manual_seed(0)
    rm = torch.randn(B, T, generator=g).to(torch.bfloat16)
    entropy = torch.rand(B, T, generator=g) * 4
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    has_eos = torch.rand(B, generator=g) < 0.7
    cuda = [x.cuda() for x in (rm, entropy, mask, has_eos)]
    rows = [0, 1, 2, int(lengths.argmax()), int(lengths.argmin())]
    rm_l, ent_l, lens, eos = as_lists(rm[rows], entropy[rows], mask[rows], has_eos[rows])
    for granularity in GRANULARITIES:
        for distribute in DISTRIBUTES:
            kwargs = {
                "granularity": granularity,
                "threshold": 2.5,
                "has_eos": cuda[3],
                "normalizer": NORMALIZERS["floored"],
                "sigma_floor": SIGMA_FLOOR,
                "distribute": distribute,
            }
            monkeypatch.setenv("SEGPPO_KERNELS", "triton")
            got = segment_rewards(*cuda[:3], **kwargs)
            monkeypatch.setenv("SEGPPO_KERNELS", "torch")
            want = segment_rewards(*cuda[:3], **kwargs)
            assert torch.equal(got.ends, want.ends) and torch.equal(got.num_segments, want.num_segments)
            torch.testing.assert_close(got.rewards, want.rewards, **TOL)
            oracle, _, _ = oracle_rewards(
                rm_l, ent_l, lens, eos, granularity, 2.5, NORMALIZERS["floored"], SIGMA_FLOOR, distribute
            )
            torch.testing.assert_close(
                got.rewards[rows].cpu().double(), torch.tensor(oracle, dtype=torch.float64), **TOL
            )
        leaf = cuda[0].clone().requires_grad_(True)
        monkeypatch.setenv("SEGPPO_KERNELS", "triton")
        scores = sequence_scores(leaf, *cuda[1:3], granularity=granularity, threshold=2.5, has_eos=cuda[3])
        scores.sum().backward()
        want_leaf = cuda[0].clone().requires_grad_(True)
        monkeypatch.setenv("SEGPPO_KERNELS", "torch")
        want = sequence_scores(want_leaf, *cuda[1:3], granularity=granularity, threshold=2.5, has_eos=cuda[3])
        want.sum().backward()
        torch.testing.assert_close(scores, want, **TOL)
        torch.testing.assert_close(leaf.grad, want_leaf.grad)
