"""PPO's loss functions, whitening and KL control against values computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_ppo import PROMPTS, ppo_config
from tiny import tiny_rm_config

from segppo.config import PPOConfig
from segppo.ppo.losses import (
    KLController,
    loss_denominator,
    masked_moments,
    mean_var,
    policy_loss,
    value_loss,
    whiten,
)
from segppo.ppo.trainer import train_ppo
from segppo.presets import PPO_PRESETS
from segppo.rm.trainer import train_reward_model
from segppo.tracking import read_metrics

LN = math.log

# Two responses of 3 and 2 tokens (the second is padded), clip ε = 0.2. Per token, by hand:
#   r=1.5, A=+1: max(−1.5, −1.2) = −1.2 (clipped)     r=0.5, A=−1: max(0.5, 0.8) = 0.8 (clipped)
#   r=1.0, A=+2: −2                                   r=1.1, A=−2: max(2.2, 2.2) = 2.2
#   r=0.7, A=+1: max(−0.7, −0.8) = −0.7
RATIOS = torch.tensor([[1.5, 0.5, 1.0], [1.1, 0.7, 1.0]])
ADVANTAGES = torch.tensor([[1.0, -1.0, 2.0], [-2.0, 1.0, 50.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _logprobs(ratios: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.full_like(ratios, -2.0)
    return old + ratios.log(), old


def test_policy_loss_by_hand():
    logprobs, old = _logprobs(RATIOS)
    loss, stats = policy_loss(logprobs, old, ADVANTAGES, MASK, clip=0.2, scale=0.5)
    assert loss.item() == pytest.approx(0.5 * (-1.2 + 0.8 - 2.0 + 2.2 - 0.7))
    assert stats["policy_loss"].item() == pytest.approx(-1.2 + 0.8 - 2.0 + 2.2 - 0.7)
    assert stats["policy_clipfrac"].item() == 2.0  # a sum over tokens: the caller divides
    log_r = RATIOS.log()[MASK.bool()]
    assert stats["approx_kl"].item() == pytest.approx((log_r.exp() - 1 - log_r).sum().item())


def test_policy_loss_gradient_by_hand():
    logprobs, old = _logprobs(RATIOS)
    logprobs.requires_grad_(True)
    loss, _ = policy_loss(logprobs, old, ADVANTAGES, MASK, clip=0.2, scale=1.0)
    loss.backward()
    # d(−A·r)/dlogπ = −A·r where the unclipped term is taken, 0 where clipped, 0 on padding.
    expected = torch.tensor([[0.0, 0.0, -2.0], [2.2, -0.7, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_separate_high_clip_range():
    logprobs, old = _logprobs(RATIOS)
    # ε_high = 0.6: r = 1.5 is inside [0.8, 1.6] now; r = 0.5 is still clipped up to 0.8.
    loss, stats = policy_loss(logprobs, old, ADVANTAGES, MASK, clip=0.2, clip_high=0.6, scale=1.0)
    assert loss.item() == pytest.approx(-1.5 + 0.8 - 2.0 + 2.2 - 0.7)
    assert stats["policy_clipfrac"].item() == 1.0
    # ε_high = ε is the symmetric default.
    same, _ = policy_loss(logprobs, old, ADVANTAGES, MASK, clip=0.2, clip_high=0.2, scale=1.0)
    assert same.item() == pytest.approx(-0.9)


def test_dual_clip_bounds_negative_advantages():
    logprobs, old = _logprobs(torch.tensor([[5.0, 5.0]]))
    advantages = torch.tensor([[-1.0, 1.0]])
    mask = torch.ones(1, 2)
    plain, plain_stats = policy_loss(logprobs, old, advantages, mask, clip=0.2, scale=1.0)
    assert plain.item() == pytest.approx(5.0 - 1.2)  # max(5, 1.2) for A < 0; max(−5, −1.2) for A > 0
    assert plain_stats["policy_dual_clipfrac"].item() == 0.0
    dual, stats = policy_loss(logprobs, old, advantages, mask, clip=0.2, dual_clip=3.0, scale=1.0)
    assert dual.item() == pytest.approx(3.0 - 1.2)  # min(5, C·|A|) = 3; A > 0 untouched
    assert stats["policy_dual_clipfrac"].item() == 1.0
    # Below the bound the dual clip changes nothing.
    logprobs, old = _logprobs(RATIOS)
    loss, _ = policy_loss(logprobs, old, ADVANTAGES, MASK, clip=0.2, dual_clip=3.0, scale=1.0)
    assert loss.item() == pytest.approx(-0.9)


@pytest.mark.parametrize("advantage", [-1.0, 0.0, 1.0])
@pytest.mark.parametrize("log_ratio", [100.0, -100.0, 1e4])
def test_a_huge_log_ratio_keeps_loss_and_gradient_finite(log_ratio, advantage):
    old = torch.tensor([[-3.0, -1.0]])
    logprobs = (old + torch.tensor([[log_ratio, 0.0]])).requires_grad_(True)
    advantages = torch.tensor([[advantage, 1.0]])
    loss, stats = policy_loss(logprobs, old, advantages, torch.ones(1, 2), clip=0.2, scale=1.0)
    loss.backward()
    assert torch.isfinite(loss), loss
    assert torch.isfinite(logprobs.grad).all(), logprobs.grad
    assert all(torch.isfinite(v) for v in stats.values()), stats


def test_seq_mean_by_hand():
    logprobs, old = _logprobs(RATIOS)
    # Per-sequence means (−1.2 + 0.8 − 2)/3 = −0.8 and (2.2 − 0.7)/2 = 0.75, then the batch mean.
    loss, stats = policy_loss(logprobs, old, ADVANTAGES, MASK, clip=0.2, scale=0.5, agg="seq-mean")
    assert loss.item() == pytest.approx((-0.8 + 0.75) / 2)
    assert stats["policy_loss"].item() == pytest.approx(-0.9)  # metrics stay token sums
    assert loss_denominator([3, 2], "seq-mean") == 2
    assert loss_denominator([3, 2], "token-mean") == 5


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_loss_does_not_depend_on_the_micro_batch_split(agg):
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 4, 2, 5]
    mask = (torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]).long()
    old = -torch.rand(6, 5, generator=generator) * 3
    logprobs = old + torch.randn(6, 5, generator=generator) * 0.3
    advantages = torch.randn(6, 5, generator=generator)
    values, old_values, returns = (torch.randn(6, 5, generator=generator) for _ in range(3))

    def losses(rows: list[int], scale: float) -> torch.Tensor:
        p, _ = policy_loss(
            logprobs[rows], old[rows], advantages[rows], mask[rows], clip=0.2, scale=scale, agg=agg
        )
        v, _ = value_loss(
            values[rows], old_values[rows], returns[rows], mask[rows], clip=0.2, scale=scale, agg=agg
        )
        return torch.stack([p, v])

    def split(groups: list[list[int]]) -> torch.Tensor:
        # As the trainer does: DeepSpeed averages the micro-batches (and ranks) of one step, so each
        # micro-batch is scaled by their number over the update's count of tokens or sequences.
        scale = len(groups) / loss_denominator(lengths, agg)
        return sum(losses(rows, scale) for rows in groups) / len(groups)

    whole = split([list(range(6))])
    torch.testing.assert_close(split([[0, 1], [2, 3], [4, 5]]), whole)
    torch.testing.assert_close(split([[0, 1, 2], [3, 4, 5]]), whole)
    torch.testing.assert_close(split([[5, 0, 3], [1, 4, 2]]), whole)


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.5], [1.0, 100.0]])
    old_values = torch.tensor([[0.5, 0.5], [0.5, 1.0]])
    returns = torch.tensor([[0.0, 1.0], [1.0, 3.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # ½·max((V−R)², (V_clip−R)²), V_clip = old + clamp(V − old, ±0.2):
    #   V=1,  old=.5, R=0: max(1, .49) = 1 → .5;   V=.5, old=.5, R=1: .25 → .125
    #   V=1,  old=.5, R=1: max(0, .09) = .09 → .045 (clipped);  the padded token does not count
    loss, stats = value_loss(values, old_values, returns, mask, clip=0.2, scale=2.0)
    assert loss.item() == pytest.approx(2.0 * 0.67)
    assert stats["value_loss"].item() == pytest.approx(0.67)
    assert stats["value_clipfrac"].item() == 1.0
    seq, _ = value_loss(values, old_values, returns, mask, clip=0.2, scale=0.5, agg="seq-mean")
    assert seq.item() == pytest.approx(((0.5 + 0.125) / 2 + 0.045) / 2)


def test_whiten_with_given_global_moments():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = whiten(x, mask, torch.tensor(2.0), torch.tensor(4.0))
    torch.testing.assert_close(out, torch.tensor([[-0.5, 0.0, 0.5], [1.0, 1.5, 0.0]]))
    # Moments summed over two "ranks" are those of all their tokens: mean 3, population var 2.
    moments = masked_moments(x[:1], mask[:1]) + masked_moments(x[1:], mask[1:])
    mean, var = mean_var(moments)
    assert mean.item() == pytest.approx(3.0)
    assert var.item() == pytest.approx(2.0)
    out = whiten(x, mask, mean, var)
    torch.testing.assert_close(out[mask.bool()], (torch.arange(1.0, 6.0) - 3) / math.sqrt(2))
    assert out[1, 2] == 0


class _OpenRLHFAdaptiveKL:
    """OpenRLHF's `AdaptiveKLController` (openrlhf/trainer/ppo_utils/kl_controller.py), its formula."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current, n_steps):
        proportional_error = np.clip(current / self.target - 1, -0.2, 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


def test_fixed_kl_controller_keeps_its_coefficient():
    controller = KLController(coef=0.05)
    for kl in (0.0, 3.0, 100.0):
        controller.update(kl, num_samples=128)
    assert controller.coef == 0.05


def test_adaptive_kl_controller_follows_openrlhf():
    ours = KLController(coef=0.1, target=6.0, horizon=10000)
    theirs = _OpenRLHFAdaptiveKL(0.1, 6.0, 10000)
    for kl, n in [(9.0, 256), (5.0, 100), (6.0, 64), (0.1, 512), (30.0, 1024), (6.5, 7)]:
        ours.update(kl, num_samples=n)
        theirs.update(kl, n)
        assert ours.coef == pytest.approx(theirs.value, rel=1e-12)
    # The first step by hand: error clipped to 0.2, β·(1 + 0.2·256/10000).
    first = KLController(coef=0.1, target=6.0)
    first.update(9.0, num_samples=256)
    assert first.coef == pytest.approx(0.1 * 1.00512)
    # A non-finite KL leaves β alone; the state round-trips.
    first.update(float("nan"), num_samples=256)
    assert first.coef == pytest.approx(0.1 * 1.00512)
    restored = KLController(coef=1.0, target=6.0)
    restored.load_state_dict(first.state_dict())
    assert restored.coef == first.coef


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("dual_clip", 1.0, "--dual-clip must be greater than 1"),
        ("policy_clip_high", 0.0, "--policy-clip-high must be positive"),
        ("loss_agg", "mean", "--loss-agg must be one of"),
    ],
)
def test_bad_loss_options_are_refused(option, value, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(policy="p", reward_model="r", prompts="x", output="o", **{option: value})


def test_paper_presets_use_seq_mean():
    assert {preset["loss_agg"] for preset in PPO_PRESETS.values()} == {"seq-mean"}
    assert PPOConfig(policy="p", reward_model="r", prompts="x", output="o").loss_agg == "token-mean"


@pytest.fixture(scope="module")
def segment_rm(tiny_lm_dir, preferences_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_segment") / "run"
    train_reward_model(
        tiny_rm_config(tiny_lm_dir, preferences_file, out, granularity="segment", max_steps=20)
    )
    return str(out)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS * 40) + "\n")
    return str(path)


def test_seq_mean_training_does_not_depend_on_the_micro_batch_split(
    tiny_lm_dir, segment_rm, prompts_file, tmp_path
):
    # One optimizer step over 16 responses, as one micro-batch or as four; the trainer divides each
    # micro-batch's per-response means by the step's response count over all ranks.
    options = dict(max_steps=1, ppo_epochs=1, loss_agg="seq-mean", dual_clip=3.0, policy_clip_high=0.28)
    whole = ppo_config(
        tiny_lm_dir, segment_rm, prompts_file, tmp_path / "whole", micro_train_batch_size=16, **options
    )
    split = ppo_config(
        tiny_lm_dir, segment_rm, prompts_file, tmp_path / "split", micro_train_batch_size=4, **options
    )
    train_ppo(whole)
    train_ppo(split)
    a, b = read_metrics(whole.output_dir, split="train")[0], read_metrics(split.output_dir, split="train")[0]
    for key in ("policy_loss", "value_loss", "policy_clipfrac", "policy_dual_clipfrac", "approx_kl"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    # Adam's first step is about lr·sign(g) where |g| is tiny, so float reassociation between the
    # two splits shows up as ~1e-4 on a few weights (lr 1e-2). (Adam is also blind to a uniform
    # scale of the loss: the normalisation itself is checked without an optimizer above.)
    wa = load_file(whole.output_dir / "policy" / "model.safetensors")
    wb = load_file(split.output_dir / "policy" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-3, atol=3e-4)
