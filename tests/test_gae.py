"""gae (DESIGN.md §3.5) on both paths against a plain float64 reverse loop.

Rows are drawn with garbage in the padding, which the op must ignore. Most tests shrink the Triton
block to 4 tokens so that tiny interpreted rows still cross several blocks and exercise the carry.
"""

import importlib
import itertools
import math

import pytest
import torch

from segppo.kernels import gae, reference

gae_module = importlib.import_module("segppo.kernels.gae")  # the package's `gae` is the function

EPS32 = torch.finfo(torch.float32).eps
GAMMAS_LAMBDAS = (1.0, 0.95, 0.5, 0.0)


def oracle_gae(rewards, values, mask, gamma, lam):
    """GAE in float64, written as the textbook reverse loop (vectorized over rows only)."""
    zero = torch.zeros((), dtype=torch.float64, device=rewards.device)
    r = torch.where(mask, rewards.double(), zero)
    v = torch.where(mask, values.double(), zero)
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64, device=r.device)
    last = torch.zeros(B, dtype=torch.float64, device=r.device)
    for t in reversed(range(T)):
        v_next = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * v_next - v[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = torch.where(mask, adv, zero)
    return adv, adv + v


def make_rows(lengths, T, *, dtype=torch.float32, device="cpu", seed=0, garbage=1e6):
    """rewards, values [B, T] with `garbage`-sized noise past each length, and the prefix mask."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.arange(T) < torch.tensor(lengths, dtype=torch.long)[:, None]
    rewards = torch.randn(B, T, generator=gen)
    values = 3 * torch.randn(B, T, generator=gen)
    junk = garbage * torch.randn(2, B, T, generator=gen)
    rewards = torch.where(mask, rewards, junk[0])
    values = torch.where(mask, values, junk[1])
    return rewards.to(device, dtype), values.to(device, dtype), mask.to(device)


def assert_matches(got, want, *inputs):
    """|got − want| ≤ 1e-5·|want| + sqrt(T)·eps32·scale, with scale the row's largest magnitude.

    The relative term is the float32 target. The absolute term covers entries that cancel to
    near 0 (A_t = r_t + γV_{t+1} − V_t can be tiny while its terms are not): float32 rounding
    errors of a length-T recurrence add up like a random walk, about sqrt(T)·eps32 times the
    magnitudes involved (measured: ≤ 12·eps32·scale at T = 4096, against 64·eps32 allowed).
    """
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    want = want.cpu()
    got = got.cpu().double()
    T = max(want.shape[-1], 1)
    magnitudes = [want.abs()] + [x.cpu().double().abs() for x in inputs]
    scale = torch.stack([m.amax(-1, keepdim=True) for m in magnitudes]).amax(0).clamp(min=1.0)
    err = (got - want).abs()
    bound = 1e-5 * want.abs() + math.sqrt(T) * EPS32 * scale
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"max error {err.max().item():.3g} (at flat index {worst.item()}: got "
        f"{got.flatten()[worst].item():.9g}, want {want.flatten()[worst].item():.9g})"
    )


def check(rewards, values, mask, gamma, lam):
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    want_adv, want_ret = oracle_gae(rewards, values, mask, gamma, lam)
    masked = [torch.where(mask, x.double(), 0.0) for x in (rewards, values)]
    assert_matches(adv, want_adv, *masked)
    assert_matches(ret, want_ret, *masked)
    return adv, ret


@pytest.fixture
def small_blocks(monkeypatch):
    """Triton blocks of 4 tokens: tiny rows cross several blocks under the interpreter."""
    monkeypatch.setattr(gae_module, "BLOCK_T", 4)


SHAPES = {
    "T=1": (1, [1]),
    "T=1-empty-row": (1, [0]),
    "T=1-B=3": (1, [0, 1, 1]),
    "one-full-block": (4, [4]),
    "two-full-blocks": (8, [8, 3]),
    "T%block!=0": (13, [0, 13, 5, 12]),
    "mixed": (17, [1, 16, 17, 4, 0, 8, 9]),
    "B=1-partial": (9, [6]),
    "all-empty": (6, [0, 0]),
}


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.95, 0.5)])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_oracle_across_shapes(kernel_path, device, small_blocks, shape, gamma, lam):
    T, lengths = shape
    check(*make_rows(lengths, T, device=device, seed=T), gamma, lam)


@pytest.mark.parametrize("gamma, lam", itertools.product(GAMMAS_LAMBDAS, GAMMAS_LAMBDAS))
def test_gamma_lambda_grid(kernel_path, device, small_blocks, gamma, lam):
    check(*make_rows([11, 6, 0, 1], 11, device=device, seed=1), gamma, lam)


@pytest.mark.parametrize("T", [1, 37])
def test_default_block_size(kernel_path, device, T):
    """One block wider than the row (16 or next_power_of_2(T) lanes), as real short batches run."""
    check(*make_rows([T, T // 2, 0], T, device=device, seed=2), 1.0, 0.95)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_float_dtypes(kernel_path, device, small_blocks, dtype):
    rewards, values, mask = make_rows([10, 3, 7], 10, dtype=dtype, device=device, seed=3, garbage=1e3)
    adv, ret = check(rewards, values, mask, 1.0, 0.95)
    assert adv.dtype == ret.dtype == torch.float32


def test_non_contiguous_inputs(kernel_path, device, small_blocks):
    rewards, values, mask = make_rows([9, 2, 5], 9, device=device, seed=4)
    rewards_t = rewards.t().contiguous().t()  # column-major
    values_wide = torch.zeros(3, 18, device=device)
    values_wide[:, ::2] = values
    mask_t = mask.t().contiguous().t()
    assert not (rewards_t.is_contiguous() or values_wide[:, ::2].is_contiguous() or mask_t.is_contiguous())
    check(rewards_t, values_wide[:, ::2], mask_t, 0.95, 0.95)


def test_padding_is_ignored(kernel_path, device, small_blocks):
    """Garbage past the response changes nothing, not even in the last response token."""
    rewards, values, mask = make_rows([7, 12, 1, 0], 12, device=device, seed=5)
    clean = [torch.where(mask, x, torch.zeros_like(x)) for x in (rewards, values)]
    got = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    want = gae(*clean, mask, gamma=1.0, lam=0.95)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_non_finite_padding_is_ignored(kernel_path, device, small_blocks):
    rewards, values, mask = make_rows([5, 12, 0], 12, device=device, seed=6)
    rewards = rewards.masked_fill(~mask, float("nan"))
    values = values.masked_fill(~mask, float("inf"))
    adv, ret = check(rewards, values, mask, 1.0, 0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


def test_returns_are_advantages_plus_values_and_zero_outside(kernel_path, device, small_blocks):
    rewards, values, mask = make_rows([10, 4, 0, 1], 10, device=device, seed=7)
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.95)
    torch.testing.assert_close(ret, adv + torch.where(mask, values, 0.0), rtol=1e-6, atol=1e-6)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    assert adv.shape == ret.shape == mask.shape and adv.device == mask.device


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (1.0, 1.0)])
def test_long_row_keeps_float32_accuracy(kernel_path, device, gamma, lam):
    """T = 4096 with the default block: four blocks chained through the carry, no overflow.

    γ = λ = 1 is the hardest case: A_t = Σ_{s≥t} r_s − V_t sums thousands of terms.
    """
    check(*make_rows([4096, 3001], 4096, device=device, seed=8), gamma, lam)


def test_triton_path_runs_the_kernel(kernel_path, device, small_blocks, monkeypatch):
    """Under SEGPPO_KERNELS=triton the reference is never called."""
    if kernel_path != "triton":
        pytest.skip("only meaningful on the Triton path")

    def fail(*args, **kwargs):
        raise AssertionError("reference.gae called on the Triton path")

    monkeypatch.setattr(reference, "gae", fail)
    check(*make_rows([5, 2], 5, device=device, seed=9), 1.0, 0.95)


@pytest.mark.parametrize("B, T", [(0, 5), (3, 0), (0, 0)])
def test_empty_shapes(kernel_path, device, B, T):
    rewards = torch.randn(B, T, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    adv, ret = gae(rewards, rewards, mask)
    assert adv.shape == ret.shape == (B, T) and adv.dtype == torch.float32


def test_outputs_carry_no_graph():
    rewards = torch.randn(2, 5, requires_grad=True)
    adv, ret = gae(rewards, rewards.detach(), torch.ones(2, 5, dtype=torch.bool))
    assert not adv.requires_grad and not ret.requires_grad


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"values": torch.zeros(2, 6)}, "values"),
        ({"rewards": torch.zeros(3, 5)}, "rewards"),
        ({"rewards": torch.zeros(2, 5, dtype=torch.long)}, "rewards"),
        ({"values": torch.zeros(2, 5, dtype=torch.int32)}, "values"),
        ({"response_mask": torch.ones(2, 5)}, "response_mask"),
        ({"response_mask": torch.ones(10, dtype=torch.bool)}, "response_mask"),
        ({"gamma": 1.5}, "gamma"),
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"lam": 1.01}, "lam"),
        ({"lam": -1e-9}, "lam"),
        ({"lam": "0.9"}, "lam"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kernel_path, kwargs, name):
    args = {
        "rewards": torch.zeros(2, 5),
        "values": torch.zeros(2, 5),
        "response_mask": torch.ones(2, 5, dtype=torch.bool),
    } | kwargs
    with pytest.raises(ValueError, match=name):
        gae(**args)


@pytest.mark.gpu
def test_gpu_large_batch_matches_oracle(monkeypatch):
    """B = 512, T = 2048 on CUDA through the default dispatch, which must pick Triton."""
    monkeypatch.delenv("SEGPPO_KERNELS", raising=False)

    def fail(*args, **kwargs):
        raise AssertionError("CUDA tensors should take the Triton kernel")

    monkeypatch.setattr(reference, "gae", fail)
    lengths = torch.randint(0, 2049, (512,), generator=torch.Generator().manual_seed(10))
    lengths[:4] = torch.tensor([0, 1, 2047, 2048])
    rewards, values, mask = make_rows(lengths.tolist(), 2048, device="cuda", seed=10)
    check(rewards, values, mask, 1.0, 0.95)
    check(rewards.bfloat16(), values.bfloat16(), mask, 1.0, 1.0)
