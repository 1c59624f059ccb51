"""The fused head (`linear_entropy_logprobs`) against the unfused path: peak memory and time on CPU.

Issue 13's CPU target: the fused head's peak memory at least 4× below the unfused path at V = 32000.

Variants:
  fused    `segppo.kernels.linear_entropy.linear_entropy_logprobs(hidden, weight, targets)`;
  unfused  `linear_entropy_logprobs_reference`: `F.linear` to the whole `[N, V]` logits, then
           `segppo.kernels.entropy_logprobs` (its chunked CPU reference).
Modes: "fwd" under no_grad (the segmenter's and the reference's passes) and "fwd+bwd" (the actor:
gradients to hidden and weight, from a loss on both outputs).

Memory is measured, not estimated, each (variant, mode, size, dtype) in a fresh subprocess, as
`bench_rm_memory.py` does: inputs built, one warm-up call on a tiny problem, VmHWM reset to the
current RSS (`/proc/self/clear_refs` = 5), then the growth of VmHWM over VmRSS across one full call
("rss": everything the process touched, allocator slack and oneDNN scratch included); a second call
under torch.profiler(profile_memory=True) gives the exact peak of live tensor bytes ("tensor").
Both include the outputs: in fwd+bwd, the gradients of hidden and weight ([V, H] float32 at the
large size, the same for both variants). Time: the best of 3 calls per variant in one more
subprocess, fused and unfused alternating (a shared machine's load drifts).

Sizes (float32, hidden H): small N=512, H=256, V=4096; large N=2048, H=512, V=32000.
SEGPPO_BENCH_THREADS sets torch's intra-op threads (default: torch's own choice).

    python benchmarks/bench_linear_entropy.py            # the table
    python -m pytest benchmarks/bench_linear_entropy.py -q
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import torch
from segppo.kernels.linear_entropy import linear_entropy_logprobs, linear_entropy_logprobs_reference

SIZES = {"small": (512, 256, 4096), "large": (2048, 512, 32000)}  # N, H, V
VARIANTS = {"fused": linear_entropy_logprobs, "unfused": linear_entropy_logprobs_reference}
MODES = ("fwd", "fwd+bwd")
DTYPE = "float32"


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    return hidden, weight, torch.randint(v, (n,), generator=g)


def run_once(fn, mode: str, hidden, weight, targets):
    if mode == "fwd":
        with torch.no_grad():
            return fn(hidden, weight, targets)
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    entropy, logprobs = fn(hidden, weight, targets)
    return torch.autograd.grad(entropy.sum() - logprobs.sum(), (hidden, weight))


def measure(variant: str, mode: str, size: str, dtype_name: str) -> dict:
    """One variant's peak extra memory and best time (this process should do nothing else)."""
    from bench_rm_memory import _status_kib, _tensor_peak_bytes

    if "SEGPPO_BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["SEGPPO_BENCH_THREADS"]))
    os.environ["SEGPPO_KERNELS"] = "torch"
    fn, dtype = VARIANTS[variant], getattr(torch, dtype_name)
    inputs = make_inputs(*SIZES[size], dtype)
    run_once(fn, mode, *make_inputs(8, 16, 64, dtype, seed=1))  # warm-up: threads, lazy init
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kib("VmRSS")
    out = run_once(fn, mode, *inputs)
    rss = (_status_kib("VmHWM") - base) * 1024
    del out
    gc.collect()
    tensor = _tensor_peak_bytes(lambda: run_once(fn, mode, *inputs))
    return {"rss": rss, "tensor": tensor, "threads": torch.get_num_threads()}


def measure_times(mode: str, size: str, dtype_name: str) -> dict:
    """Best of 3 calls per variant, the variants alternating (fused, unfused, fused, ...) so that a
    load change on a shared machine hits both alike."""
    if "SEGPPO_BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["SEGPPO_BENCH_THREADS"]))
    inputs = make_inputs(*SIZES[size], getattr(torch, dtype_name))
    times = {name: [] for name in VARIANTS}
    for _ in range(3):
        for name, fn in VARIANTS.items():
            start = time.perf_counter()
            run_once(fn, mode, *inputs)
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def in_subprocess(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, SEGPPO_KERNELS="torch"),
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_all() -> dict:
    """{(size, mode, variant): {rss, tensor, threads, seconds}}, each figure from a fresh process."""
    found = {}
    for size in SIZES:
        for mode in MODES:
            seconds = in_subprocess("time", mode, size, DTYPE)
            for variant in VARIANTS:
                found[(size, mode, variant)] = in_subprocess("measure", variant, mode, size, DTYPE)
                found[(size, mode, variant)]["seconds"] = seconds[variant]
                print(size, mode, variant, found[(size, mode, variant)], file=sys.stderr, flush=True)
    return found


def table(results: dict) -> list[str]:
    def mib(x):
        return "-" if x is None else f"{x / 2**20:.1f}"

    lines = [
        f"{'size':<6} {'N':>5} {'H':>4} {'V':>6} {'mode':<8} {'variant':<8} {'ms':>8} "
        f"{'rss MiB':>8} {'tensor MiB':>10} {'logits MiB':>10}"
    ]
    for (size, mode, variant), got in results.items():
        n, h, v = SIZES[size]
        logits = n * v * torch.empty((), dtype=getattr(torch, DTYPE)).element_size()
        lines.append(
            f"{size:<6} {n:>5} {h:>4} {v:>6} {mode:<8} {variant:<8} {got['seconds'] * 1e3:>8.1f} "
            f"{mib(got['rss']):>8} {mib(got['tensor']):>10} {mib(logits):>10}"
        )
    for size in SIZES:
        for mode in MODES:
            fused, unfused = results.get((size, mode, "fused")), results.get((size, mode, "unfused"))
            if fused and unfused:
                parts = [
                    f"{kind} {unfused[kind] / fused[kind]:.1f}x below"
                    for kind in ("rss", "tensor")
                    if fused[kind] and unfused[kind] is not None
                ]
                lines.append(
                    f"{size} {mode}: fused peak {', '.join(parts)}; "
                    f"time {fused['seconds'] / unfused['seconds']:.2f}x of unfused"
                )
    return lines


def test_linear_entropy_memory_and_time(benchmark):
    """The fused head matches the unfused one at the large size, then the table (recorded as
    extra_info; figures are never asserted)."""
    inputs = make_inputs(*SIZES["large"], torch.float32)
    got = run_once(linear_entropy_logprobs, "fwd", *inputs)
    want = run_once(linear_entropy_logprobs_reference, "fwd", *inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    results = measure_all()
    benchmark.pedantic(lambda: run_once(linear_entropy_logprobs, "fwd", *inputs), rounds=1, iterations=1)
    benchmark.extra_info.update({"/".join(k): v for k, v in results.items()})
    print("\n".join(table(results)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        print(json.dumps(measure(*sys.argv[2:6])))
    elif len(sys.argv) > 1 and sys.argv[1] == "time":
        print(json.dumps(measure_times(*sys.argv[2:5])))
    else:
        print("\n".join(table(measure_all())))
