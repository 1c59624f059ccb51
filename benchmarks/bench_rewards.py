"""The reward/advantage phase of PPO: segment ends from entropy, normalized segment rewards spread
over their tokens (`interpolate`), then GAE.

On CPU at B = 64, T = 1024 it is timed three ways:
  segppo     the public functions (`segment_rewards`, `gae`), which run the torch reference on CPU;
  reference  `segppo.kernels.reference` called directly (the dispatch and checks left out);
  loop       a per-token Python loop in the style of the paper's code (an early OpenRLHF fork):
             `.item()` per token to find entropy spikes, a list of ends per row, one normalized
             reward per segment, and OpenRLHF's `for t in reversed(range(T))` GAE over the batch.
With CUDA it also times the Triton kernels (and, for scale, the reference) at B = 512, T = 2048,
`segment_rewards` and `gae` separately.

    python -m pytest benchmarks/bench_rewards.py -q --benchmark-min-rounds=3

SEGPPO_BENCH_B / SEGPPO_BENCH_T override the sizes (both the CPU and the CUDA ones). The CPU
comparison runs torch on SEGPPO_BENCH_THREADS intra-op threads (default 1): the loop is serial
Python anyway, and on a small shared machine extra threads mostly add contention and noise, so one
thread gives stable medians and a conservative ratio. Medians and the loop/segppo ratio are
printed at the end of the module.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch

from segppo.kernels import gae, reference, segment_rewards

THRESHOLD = 2.0
# [a, b, c, d] of §3.3, of the size the paper fits: μ(p) = a ln p + c, σ(p) = max(b ln p + d, floor).
NORMALIZER = (-0.35, 0.12, 0.4, 0.9)
SIGMA_FLOOR = 1e-2
GAMMA, LAM = 1.0, 0.95


def _size(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class Rollout(NamedTuple):
    rm_values: torch.Tensor  # [B, T] the RM's per-token scalar
    entropy: torch.Tensor  # [B, T] the reference model's next-token entropy
    values: torch.Tensor  # [B, T] the critic
    mask: torch.Tensor  # [B, T] bool, response tokens (each response ends with its EOS)


def make_rollout(B: int, T: int, device: str = "cpu", seed: int = 0) -> Rollout:
    """Responses of T/2..T tokens; entropy spikes above τ = 2 on ~15% of tokens (segments of ~7)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(T // 2, 1), T + 1, (B,), generator=gen)
    mask = torch.arange(T) < lengths[:, None]
    entropy = 2.35 * torch.rand(B, T, generator=gen)
    rm_values = torch.randn(B, T, generator=gen)
    values = torch.randn(B, T, generator=gen)
    return Rollout(*(x.to(device) for x in (rm_values, entropy, values, mask)))


def segppo_phase(batch: Rollout):
    """segppo's public API: what the PPO trainer calls."""
    seg = segment_rewards(
        batch.rm_values,
        batch.entropy,
        batch.mask,
        threshold=THRESHOLD,
        normalizer=NORMALIZER,
        sigma_floor=SIGMA_FLOOR,
    )
    return (seg.rewards, *gae(seg.rewards, batch.values, batch.mask, gamma=GAMMA, lam=LAM))


def reference_phase(batch: Rollout):
    """The vectorized torch references, called directly."""
    seg = reference.segment_rewards(
        batch.rm_values,
        batch.entropy,
        batch.mask,
        granularity="segment",
        threshold=THRESHOLD,
        normalizer=NORMALIZER,
        sigma_floor=SIGMA_FLOOR,
        distribute="interpolate",
    )
    return (seg.rewards, *reference.gae(seg.rewards, batch.values, batch.mask, gamma=GAMMA, lam=LAM))


def python_loop_phase(batch: Rollout):
    """The same numbers the way the paper's code gets them: Python loops over rows and tokens."""
    rm_values, entropy, values, action_mask = batch
    batch_size, num_actions = action_mask.shape
    a, b, c, d = NORMALIZER
    spikes = (entropy > THRESHOLD).float()
    rewards = torch.zeros_like(rm_values, dtype=torch.float)
    for i in range(batch_size):
        eos_index = action_mask[i].nonzero()[-1].item()
        last = eos_index - 1  # dense segments leave the trailing EOS out
        segment_end_positions = []
        for j in range(0, last):
            if spikes[i, j].item() == 1:
                segment_end_positions.append(j)
        segment_end_positions.append(last if last >= 0 else eos_index)
        total_segments = len(segment_end_positions)
        for pos, end_pos in enumerate(segment_end_positions):
            position_percentage = torch.tensor((pos + 1) / total_segments)
            adjusted_mean = a * torch.log(position_percentage) + c
            adjusted_std = (b * torch.log(position_percentage) + d).clamp(min=SIGMA_FLOOR)
            value_at_end = (rm_values[i, end_pos] - adjusted_mean) / adjusted_std
            start_pos = segment_end_positions[pos - 1] + 1 if pos > 0 else 0
            segment_length = end_pos - start_pos + 1
            rewards[i, start_pos : end_pos + 1] = value_at_end / segment_length

    # GAE as OpenRLHF's get_advantages_and_returns: one step per token, vectorized over the batch.
    values = action_mask * values
    rewards_masked = action_mask * rewards
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(num_actions)):
        nextvalues = values[:, t + 1] if t < num_actions - 1 else 0.0
        delta = rewards_masked[:, t] + GAMMA * nextvalues - values[:, t]
        lastgaelam = delta + GAMMA * LAM * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return rewards, advantages, advantages + values


PHASES = {"segppo": segppo_phase, "reference": reference_phase, "loop": python_loop_phase}


@pytest.fixture(scope="module")
def medians(request):
    """Collects each benchmark's median (seconds) and prints them, with the ratio, at the end."""
    found: dict[str, float] = {}
    yield found
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not found:
        return
    lines = [f"median {name:<32} {seconds * 1e6:12.1f} µs" for name, seconds in found.items()]
    if "cpu/loop" in found and "cpu/segppo" in found:
        ratio = found["cpu/loop"] / found["cpu/segppo"]
        lines.append(f"python loop / segppo on CPU: {ratio:.0f}x (target >= 50x)")
    with capture.global_and_fixture_disabled():  # module teardown output is captured otherwise
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


def _record(benchmark, medians: dict, name: str, **info) -> None:
    benchmark.extra_info.update(info)
    if benchmark.stats is not None:  # None under --benchmark-disable
        medians[name] = benchmark.stats.stats.median


@pytest.fixture(scope="module")
def cpu_rollout():
    B, T = _size("SEGPPO_BENCH_B", 64), _size("SEGPPO_BENCH_T", 1024)
    batch = make_rollout(B, T)
    # The three ways agree; checked once, outside the timed part.
    want = python_loop_phase(batch)
    for name in ("segppo", "reference"):
        for got, expected in zip(PHASES[name](batch), want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(_size("SEGPPO_BENCH_THREADS", 1))
    yield batch
    torch.set_num_threads(threads)


@pytest.mark.benchmark(group="rewards+gae cpu")
@pytest.mark.parametrize("way", list(PHASES))
def test_rewards_gae_cpu(benchmark, medians, cpu_rollout, way, monkeypatch):
    monkeypatch.delenv("SEGPPO_KERNELS", raising=False)  # CPU tensors: the public API's own choice
    benchmark(PHASES[way], cpu_rollout)
    B, T = cpu_rollout.mask.shape
    _record(benchmark, medians, f"cpu/{way}", B=B, T=T, threads=torch.get_num_threads())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_rollout():
    B, T = _size("SEGPPO_BENCH_B", 512), _size("SEGPPO_BENCH_T", 2048)
    return make_rollout(B, T, device="cuda")


def _cuda_ops(batch: Rollout):
    rewards = reference_phase(batch)[0]  # gae's input, whichever segment_rewards is timed
    return {
        "segment_rewards": lambda: segment_rewards(
            batch.rm_values,
            batch.entropy,
            batch.mask,
            threshold=THRESHOLD,
            normalizer=NORMALIZER,
            sigma_floor=SIGMA_FLOOR,
        ),
        "gae": lambda: gae(rewards, batch.values, batch.mask, gamma=GAMMA, lam=LAM),
    }


@needs_cuda
@pytest.mark.benchmark(group="cuda")
@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("op", ["segment_rewards", "gae"])
def test_cuda_op(benchmark, medians, cuda_rollout, op, path, monkeypatch):
    monkeypatch.setenv("SEGPPO_KERNELS", path)
    try:
        fn = _cuda_ops(cuda_rollout)[op]
        fn()  # compile and warm up outside the timing
    except NotImplementedError:
        pytest.skip(f"{op} has no Triton implementation yet")

    def run():
        fn()
        torch.cuda.synchronize()  # time the kernels, not their launch

    benchmark(run)
    B, T = cuda_rollout.mask.shape
    _record(benchmark, medians, f"cuda/{op}/{path}", B=B, T=T)
