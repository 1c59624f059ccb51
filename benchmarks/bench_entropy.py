"""entropy_logprobs (with targets) against eager torch and torch.compile of the same eager code.

Variants, in groups named "entropy_logprobs <fwd|fwd+bwd> <device> <dtype> N=.. V=..":
  segppo    the public `entropy_logprobs`: the Triton kernels on CUDA; on CPU the torch reference
            (SEGPPO_KERNELS=torch), since the Triton path there is only the interpreter;
  eager     `logits.float().log_softmax(-1)`, then entropy and gather (a float32 copy and more);
  compiled  torch.compile of `eager`;
  copy      CUDA only: `torch.empty_like(x).copy_(x)`, the memory-bandwidth yardstick.

Defaults: CUDA N=16384, V=128256 (Llama-3's vocabulary) in bf16; CPU N=256, V=32000 in fp32 and
bf16. SEGPPO_BENCH_N / SEGPPO_BENCH_V override the sizes, SEGPPO_BENCH_DTYPES the dtypes (e.g.
"bfloat16,float32"), SEGPPO_BENCH_COMPILE=0 leaves torch.compile out, SEGPPO_BENCH_THREADS sets
torch's intra-op threads (default: torch's own choice).

    python -m pytest benchmarks/bench_entropy.py -q --benchmark-min-rounds=3

Each result's extra_info has the bytes an ideal kernel moves (fwd: the logits once; fwd+bwd: the
logits twice and the gradient once; copy: read plus write), the GB/s that implies, and on CUDA
the peak memory allocated beyond the inputs. Medians and GB/s are printed at the end.
"""

from __future__ import annotations

import os

import pytest
import torch

from segppo.kernels import entropy_logprobs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
N = int(os.environ.get("SEGPPO_BENCH_N", 16384 if CUDA else 256))
V = int(os.environ.get("SEGPPO_BENCH_V", 128256 if CUDA else 32000))
DTYPES = [
    getattr(torch, name.strip())
    for name in os.environ.get("SEGPPO_BENCH_DTYPES", "bfloat16" if CUDA else "float32,bfloat16").split(",")
]
COMPILE = os.environ.get("SEGPPO_BENCH_COMPILE", "1") != "0"
SEGPPO_PATH = "triton" if CUDA else "torch"


def eager(logits: torch.Tensor, targets: torch.Tensor):
    """What one would write without a kernel: materializes float32 log-probs of every entry."""
    logp = logits.float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy, logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def segppo(logits: torch.Tensor, targets: torch.Tensor):
    return entropy_logprobs(logits, targets)


_compiled = torch.compile(eager, dynamic=False) if COMPILE else None


def compiled(logits: torch.Tensor, targets: torch.Tensor):
    return _compiled(logits, targets)


def copy(logits: torch.Tensor, targets: torch.Tensor):
    return torch.empty_like(logits).copy_(logits)


VARIANTS = {"segppo": segppo, "eager": eager, "compiled": compiled, "copy": copy}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture(scope="module")
def results(request):
    """Collects (median seconds, GB/s) per benchmark and prints them at the end of the module."""
    found: dict[str, tuple[float, float]] = {}
    yield found
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not found:
        return
    with capture.global_and_fixture_disabled():  # module teardown output is captured otherwise
        reporter.write_line("")
        reporter.write_line(
            f"entropy_logprobs on {DEVICE}, N={N}, V={V}, {torch.get_num_threads()} threads "
            f"(segppo = {SEGPPO_PATH} path)"
        )
        for name, (median, gbps) in found.items():
            reporter.write_line(f"median {name:<36} {median * 1e3:10.3f} ms {gbps:9.1f} GB/s")


@pytest.fixture(scope="module", params=DTYPES, ids=_dtype_name)
def data(request):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(N, V, generator=gen, device=DEVICE, dtype=torch.float32).mul_(3).to(request.param)
    targets = torch.randint(0, V, (N,), generator=gen, device=DEVICE)
    return logits, targets


@pytest.fixture(autouse=True)
def _segppo_path(monkeypatch):
    monkeypatch.setenv("SEGPPO_KERNELS", SEGPPO_PATH)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    threads = torch.get_num_threads()
    if "SEGPPO_BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["SEGPPO_BENCH_THREADS"]))
    yield
    torch.set_num_threads(threads)


def _prepare(variant: str, logits: torch.Tensor, targets: torch.Tensor):
    """Check the variant against eager once and warm it up (compilation stays out of the timing)."""
    if variant == "copy" and not CUDA:
        pytest.skip("the copy yardstick is for GPU bandwidth; CPU timings are not bandwidth-bound")
    if variant == "compiled" and not COMPILE:
        pytest.skip("SEGPPO_BENCH_COMPILE=0")
    fn = VARIANTS[variant]
    try:
        got = fn(logits, targets)
    except Exception as exc:  # torch.compile needs a working C++ (CPU) or Triton (GPU) toolchain
        if variant != "compiled":
            raise
        pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}"[:300])
    if variant != "copy":
        for a, b in zip(got, eager(logits, targets), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    return fn


def _peak_extra_bytes(run) -> int | None:
    """Peak CUDA memory allocated by one call beyond what was allocated before it."""
    if not CUDA:
        return None
    _sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = run()
    _sync()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def _record(benchmark, results, name, logits, bytes_moved, peak):
    logits_bytes = logits.numel() * logits.element_size()
    benchmark.extra_info.update(
        N=N,
        V=V,
        dtype=_dtype_name(logits.dtype),
        segppo_path=SEGPPO_PATH,
        threads=torch.get_num_threads(),
        bytes_moved=bytes_moved,
        peak_extra_bytes=peak,
        peak_extra_vs_logits=None if peak is None else round(peak / logits_bytes, 4),
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = round(bytes_moved / median / 1e9, 1)
        results[name] = (median, bytes_moved / median / 1e9)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward(benchmark, results, data, variant):
    logits, targets = data
    fn = _prepare(variant, logits, targets)
    benchmark.group = f"entropy_logprobs fwd {DEVICE} {_dtype_name(logits.dtype)} N={N} V={V}"

    def run():
        out = fn(logits, targets)
        _sync()  # time the kernels, not their launch
        return out

    peak = _peak_extra_bytes(run)
    benchmark(run)
    logits_bytes = logits.numel() * logits.element_size()
    moved = 2 * logits_bytes if variant == "copy" else logits_bytes
    _record(benchmark, results, f"fwd/{_dtype_name(logits.dtype)}/{variant}", logits, moved, peak)


@pytest.mark.parametrize("variant", ["segppo", "eager", "compiled"])
def test_forward_backward(benchmark, results, data, variant):
    logits, targets = data
    _prepare(variant, logits, targets)
    fn = VARIANTS[variant]
    benchmark.group = f"entropy_logprobs fwd+bwd {DEVICE} {_dtype_name(logits.dtype)} N={N} V={V}"
    x = logits.detach().requires_grad_()

    def run():
        x.grad = None
        entropy, logprobs = fn(x, targets)
        (entropy.sum() + logprobs.sum()).backward()
        _sync()
        return x.grad

    try:
        run()  # compiles the backward graph of `compiled` and warms the Triton backward
    except Exception as exc:
        if variant != "compiled":
            raise
        pytest.skip(f"torch.compile backward failed here: {type(exc).__name__}: {exc}"[:300])
    x.grad = None  # so that the peak counts this call's gradient
    peak = _peak_extra_bytes(run)
    benchmark(run)
    moved = 3 * logits.numel() * logits.element_size()  # read twice, write the gradient once
    _record(benchmark, results, f"fwd+bwd/{_dtype_name(logits.dtype)}/{variant}", logits, moved, peak)
