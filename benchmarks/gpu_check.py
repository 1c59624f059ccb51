"""One check for a CUDA machine: every op's Triton path against its torch reference, the
benchmarks, then the stack end to end (benchmarks/gpu_stack.py: a tiny `ppo train` in bf16 with the
Triton kernels and the fused head, packing under flash attention, the vLLM engine with sleep mode),
closing with one table of what passed, failed or was skipped and why. Installs nothing; at most
about 8 minutes on an H100/H200 (kernels and benchmarks 2-4, the stack's sections each under their
own time limit).

    python benchmarks/gpu_check.py                 # everything on cuda
    python benchmarks/gpu_check.py --no-bench      # no benchmarks
    python benchmarks/gpu_check.py --no-stack      # the kernels only
    python benchmarks/gpu_check.py --device cpu --quick   # tiny sizes, Triton interpreted on CPU

Correctness (Triton path, forced with SEGPPO_KERNELS=triton, against `segppo.kernels.reference`):
  entropy_logprobs   fp32 and bf16, V in 32000, 50257, 128256, 152064 (quick: 300 in 64-wide
                     blocks), values and gradients; rows whose first block is all −inf with
                     the rest below −87·T, a row with one finite entry, a NaN row, a fully −inf row;
                     temperature 0.7; a row-strided view (`[B, S, V][:, -k:]`) and a column-strided one;
  segment_rewards,   every granularity × distribute, a normalizer, has_eos, column-strided inputs;
  sequence_scores
  gae                γ ∈ {1, 0.99}, strided values;
  fused head         `linear_entropy_logprobs` on the device against the unfused path, fp32/bf16.
Benchmarks (CUDA only, one table): entropy fwd and fwd+bwd (bf16, N=16384, V=128256) for segppo,
eager torch, torch.compile(eager) and a device-to-device copy of the logits measured in the same run
(GB/s of the bytes an ideal kernel moves, and % of the copy's); the fused head against F.linear +
entropy_logprobs (N=16384, H=4096, V=128256 bf16: time and peak extra memory); segment_rewards
and gae at B=512, T=2048 against their torch references.

The stack's sections and what they check: benchmarks/gpu_stack.py.

Exit status: 0 nothing failed (skips included), 1 a check failed, 2 no CUDA device (one line on stderr).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

NO_CUDA = (
    "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, "
    "or pass --device cpu --quick for the interpreted check"
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (what the CPU test runs)")
    parser.add_argument("--no-bench", action="store_true", help="correctness only")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--no-stack", action="store_true", help="leave out the end-to-end sections")
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds for the whole check; sections that would start with too little are skipped "
        "(default: 480 on cuda, none on cpu)",
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# correctness


class Checks:
    """Collects (name, max abs error, tolerance, ok) rows."""

    def __init__(self):
        self.rows: list[tuple[str, float, float, bool]] = []

    def close(self, name, got, want, tol):
        import torch

        got, want = got.detach().double(), want.detach().double()
        same_nan = bool((got.isnan() == want.isnan()).all())
        # Equal entries (the same ±inf included) are exact; NaN must be NaN in both.
        diff = torch.where((got == want) | want.isnan(), 0.0, (got - want).abs()).nan_to_num(nan=math.inf)
        err = float(diff.max()) if diff.numel() else 0.0
        ok = same_nan and bool((diff <= tol + tol * want.abs().nan_to_num(nan=0.0)).all())
        self.rows.append((name, err, tol, ok))

    def equal(self, name, got, want):
        ok = bool((got == want).all())
        self.rows.append((name, 0.0 if ok else float("nan"), 0.0, ok))


def entropy_inputs(torch, n, v, dtype, device, block):
    g = torch.Generator().manual_seed(v)
    x = torch.randn(n, v, generator=g) * 3
    x[0, :block] = -math.inf  # the masked-first-block case: the rest below −87
    x[0, block:] = -100.0 - torch.rand(v - block, generator=g)
    x[1] = -math.inf
    x[1, v // 2] = 5.0  # one finite entry: H = 0, log p = 0 there
    x[2, 1] = math.nan
    x[3] = -math.inf  # fully masked
    return x.to(dtype).to(device), torch.randint(v, (n,), generator=g).to(device)


def check_entropy(checks, torch, device, vocabs, dtypes, block):
    from segppo.kernels import entropy_logprobs, reference

    n = 8
    for dtype in dtypes:
        for v in vocabs:
            x, t = entropy_inputs(torch, n, v, dtype, device, min(block, v - 1))
            name = f"entropy {str(dtype)[6:]} V={v}"
            views = {
                "": x,
                " row-strided": torch.cat([x, x], 1).view(n, 2, v)[:, -1],  # rows 2V apart
                " col-strided": torch.stack([x, x], -1)[..., 0],  # stride 2 along V
            }
            for label, logits in views.items():
                for temperature in (1.0, 0.7):
                    leaf = logits.detach().requires_grad_()
                    ref_leaf = logits.detach().requires_grad_()
                    h, lp = entropy_logprobs(leaf, t, temperature=temperature)
                    rh, rlp = reference.entropy_logprobs(ref_leaf, t, temperature=temperature)
                    tag = f"{name}{label} T={temperature}"
                    checks.close(f"{tag} entropy", h, rh, 1e-4)
                    checks.close(f"{tag} logprobs", lp, rlp, 1e-4)
                    w = torch.linspace(-1, 2, n, device=device)
                    ok = ~(rh.isnan() | rlp.isnan())  # rows 2, 3 have NaN outputs, hence NaN grads
                    loss = (w * h)[ok].sum() + (w.flip(0) * lp)[ok].sum()
                    ref_loss = (w * rh)[ok].sum() + (w.flip(0) * rlp)[ok].sum()
                    (grad,) = torch.autograd.grad(loss, leaf)
                    (ref_grad,) = torch.autograd.grad(ref_loss, ref_leaf)
                    checks.close(f"{tag} grad", grad, ref_grad, 1e-5 if dtype == torch.float32 else 1e-2)


def rewards_inputs(torch, b, t, device):
    g = torch.Generator().manual_seed(b * t)
    rm = torch.randn(b, 2 * t, generator=g).to(device)[:, ::2]  # column-strided on the device
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    entropy = grid[torch.randint(len(grid), (b, t), generator=g)]
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[:3] = torch.tensor([t, 1, 0])[:b]
    mask = torch.arange(t)[None, :] < lengths[:, None]
    has_eos = torch.rand(b, generator=g) < 0.5
    return [rm, *(x.to(device) for x in (entropy, mask, has_eos))]


def check_rewards(checks, torch, device, b, t):
    from segppo.kernels import reference, segment_rewards, sequence_scores

    rm, entropy, mask, has_eos = rewards_inputs(torch, b, t, device)
    for granularity in ("segment", "token", "bandit"):
        for distribute in ("interpolate", "repeat", "end"):
            for normalizer in (None, (0.5, 0.4, -0.2, 0.3)):
                kw = dict(granularity=granularity, threshold=2.0, has_eos=has_eos)
                extra = dict(normalizer=normalizer, sigma_floor=0.1, distribute=distribute)
                got = segment_rewards(rm, entropy, mask, **kw, **extra)
                want = reference.segment_rewards(rm, entropy, mask, **kw, **extra)
                tag = f"segment_rewards {granularity}/{distribute}/{'norm' if normalizer else 'raw'} T={t}"
                checks.close(f"{tag} rewards", got.rewards, want.rewards, 1e-5)
                checks.equal(f"{tag} ends", got.ends, want.ends)
                checks.equal(f"{tag} counts", got.num_segments, want.num_segments)
        got = sequence_scores(rm, entropy, mask, granularity=granularity, threshold=2.0, has_eos=has_eos)
        want = reference.sequence_scores(
            rm, entropy, mask, granularity=granularity, threshold=2.0, has_eos=has_eos
        )
        checks.close(f"sequence_scores {granularity} T={t}", got, want, 1e-5)


def check_gae(checks, torch, device, b, t):
    from segppo.kernels import gae, reference

    rm, _, mask, _ = rewards_inputs(torch, b, t, device)
    values = torch.randn(b, t + 1, generator=torch.Generator().manual_seed(1)).to(device)[:, 1:]
    for gamma in (1.0, 0.99):
        got = gae(rm, values, mask, gamma=gamma, lam=0.95)
        want = reference.gae(rm, values, mask, gamma=gamma, lam=0.95)
        checks.close(f"gae γ={gamma} T={t} advantages", got[0], want[0], 1e-4)
        checks.close(f"gae γ={gamma} T={t} returns", got[1], want[1], 1e-4)


def check_fused_head(checks, torch, device, n, h, vocabs, dtypes):
    from segppo.kernels.linear_entropy import linear_entropy_logprobs

    from segppo.kernels import reference

    for dtype in dtypes:
        for v in vocabs:
            g = torch.Generator().manual_seed(v + 1)
            hidden = torch.randn(n, h, generator=g).to(dtype).to(device).requires_grad_()
            weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).to(device).requires_grad_()
            targets = torch.randint(v, (n,), generator=g).to(device)
            ent, lp = linear_entropy_logprobs(hidden, weight, targets, temperature=0.7)
            logits = torch.nn.functional.linear(hidden, weight)
            rent, rlp = reference.entropy_logprobs(logits, targets, temperature=0.7)
            tag = f"fused head {str(dtype)[6:]} N={n} H={h} V={v}"
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            checks.close(f"{tag} entropy", ent, rent, tol)
            checks.close(f"{tag} logprobs", lp, rlp, tol)
            grads = torch.autograd.grad((ent - lp).sum(), (hidden, weight))
            ref_grads = torch.autograd.grad((rent - rlp).sum(), (hidden, weight))
            for label, got, want in zip(("hidden", "weight"), grads, ref_grads, strict=True):
                checks.close(f"{tag} grad {label}", got, want, 1e-4 if dtype == torch.float32 else 5e-2)


def correctness(torch, device, quick):
    import segppo.kernels.entropy as entropy_module

    checks = Checks()
    dtypes = (torch.float32, torch.bfloat16)
    if quick:  # interpreted: small rows, and blocks small enough that a row spans several
        entropy_module.MAX_BLOCK_V = 64
        check_entropy(checks, torch, device, (300,), dtypes, 64)
        check_rewards(checks, torch, device, 6, 37)
        check_gae(checks, torch, device, 6, 37)
        check_fused_head(checks, torch, device, 16, 8, (37,), dtypes)
    else:
        block = getattr(entropy_module, "MAX_BLOCK_V", 4096)
        check_entropy(checks, torch, device, (32000, 50257, 128256, 152064), dtypes, block)
        check_rewards(checks, torch, device, 64, 2048)
        check_gae(checks, torch, device, 64, 2048)
        check_fused_head(checks, torch, device, 512, 1024, (32000, 152064), dtypes)
    return checks


# ---------------------------------------------------------------------------------------------
# benchmarks (CUDA)


def cuda_time(torch, fn, min_seconds=0.3, max_reps=50):
    """Median milliseconds of `fn()` over CUDA events, after two warm-up calls."""
    fn(), fn()
    torch.cuda.synchronize()
    times, start_all = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start_all < min_seconds and len(times) < max_reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_extra_bytes(torch, fn):
    fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def bench_entropy(torch, rows, compile_too):
    from segppo.kernels import entropy_logprobs

    n, v = 16384, 128256
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(v, (n,), device="cuda")
    nbytes = logits.numel() * logits.element_size()

    def eager(x, t):
        logp = x.float().log_softmax(-1)
        return -(logp.exp() * logp).sum(-1), logp.gather(-1, t[:, None]).squeeze(-1)

    variants = {"segppo": entropy_logprobs, "eager": eager}
    if compile_too:
        variants["compiled"] = torch.compile(eager, dynamic=False)
    copy_ms = cuda_time(torch, lambda: torch.empty_like(logits).copy_(logits))
    copy_gbs = 2 * nbytes / copy_ms / 1e6
    rows.append(("copy (read+write)", f"bf16 N={n} V={v}", copy_ms, f"{copy_gbs:.0f} GB/s", "100%"))
    for mode, moved in (("fwd", nbytes), ("fwd+bwd", 3 * nbytes)):  # fwd+bwd: 2 reads + grad write
        for name, fn in variants.items():
            if mode == "fwd":

                def run(fn=fn):
                    with torch.no_grad():
                        return fn(logits, targets)
            else:
                leaf = logits.detach().requires_grad_()

                def run(fn=fn, leaf=leaf):
                    h, lp = fn(leaf, targets)
                    return torch.autograd.grad(h.sum() - lp.sum(), leaf)

            try:
                ms = cuda_time(torch, run)
            except Exception as e:  # noqa: BLE001 - a failed variant is a row, not the end of the run
                rows.append((f"entropy {mode} {name}", f"bf16 N={n} V={v}", math.nan, type(e).__name__, ""))
                continue
            gbs = moved / ms / 1e6
            rows.append(
                (
                    f"entropy {mode} {name}",
                    f"bf16 N={n} V={v}",
                    ms,
                    f"{gbs:.0f} GB/s",
                    f"{gbs / copy_gbs:.0%}",
                )
            )


def bench_fused_head(torch, rows):
    from segppo.kernels.linear_entropy import linear_entropy_logprobs

    from segppo.kernels import entropy_logprobs

    n, h, v = 16384, 4096, 128256
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(v, h, device="cuda", dtype=torch.bfloat16) / h**0.5
    targets = torch.randint(v, (n,), device="cuda")
    logits_bytes = n * v * 2

    def unfused(x, w, t):
        return entropy_logprobs(torch.nn.functional.linear(x, w), t)

    size = f"bf16 N={n} H={h} V={v}"
    for mode in ("fwd", "fwd+bwd"):
        for name, fn in (("fused", linear_entropy_logprobs), ("unfused", unfused)):

            def run(fn=fn, mode=mode):
                if mode == "fwd":
                    with torch.no_grad():
                        return fn(hidden, weight, targets)
                x, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
                ent, lp = fn(x, w, targets)
                return torch.autograd.grad(ent.sum() - lp.sum(), (x, w))

            ms = cuda_time(torch, run, min_seconds=0.1, max_reps=5)
            peak = peak_extra_bytes(torch, run)
            rows.append(
                (
                    f"head {mode} {name}",
                    size,
                    ms,
                    f"{peak / 2**20:.0f} MiB peak",
                    f"{peak / logits_bytes:.3f} logits",
                )
            )


def bench_rewards_gae(torch, rows):
    from segppo.kernels import gae, reference, segment_rewards

    b, t = 512, 2048
    rm, entropy, mask, has_eos = rewards_inputs(torch, b, t, "cuda")
    values = torch.randn(b, t, device="cuda")
    kw = dict(granularity="segment", threshold=2.0, has_eos=has_eos, normalizer=(0.5, 0.4, -0.2, 0.3))
    cases = {
        "segment_rewards triton": lambda: segment_rewards(rm, entropy, mask, **kw),
        "segment_rewards torch": lambda: reference.segment_rewards(
            rm, entropy, mask, **kw, sigma_floor=0.01, distribute="interpolate"
        ),
        "gae triton": lambda: gae(rm, values, mask, gamma=1.0, lam=0.95),
        "gae torch": lambda: reference.gae(rm, values, mask, gamma=1.0, lam=0.95),
    }
    for name, fn in cases.items():
        rows.append((name, f"B={b} T={t}", cuda_time(torch, fn), "", ""))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]  # gpu_stack, and segppo from this checkout
    from gpu_stack import CUDA_BUDGET_S, SECTIONS, Row, prepare_environment, print_table, run_sections

    prepare_environment(args.device)  # the Triton path (interpreted on CPU), before triton's import
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    started = time.perf_counter()
    checks = correctness(torch, args.device, args.quick)
    failed = [row for row in checks.rows if not row[3]]
    print(f"correctness: {len(checks.rows) - len(failed)}/{len(checks.rows)} checks pass")
    for name, err, tol, _ in failed:
        print(f"  FAIL {name}: max abs error {err:.3g} (tolerance {tol:g} + {tol:g}·|want|)")
    summary = [
        Row(
            f"kernels ({args.device}: Triton against the torch references)",
            "FAIL" if failed else "PASS",
            f"{len(checks.rows) - len(failed)}/{len(checks.rows)} checks pass"
            + (f"; first failure: {failed[0][0]}" if failed else ""),
            time.perf_counter() - started,
        )
    ]
    bench_rows: list[tuple] = []
    if args.device == "cuda" and not args.no_bench:
        bench_started = time.perf_counter()
        bench_entropy(torch, bench_rows, not args.no_compile)
        bench_fused_head(torch, bench_rows)
        bench_rewards_gae(torch, bench_rows)
        gpu = torch.cuda.get_device_name()
        print(f"\n{gpu}, torch {torch.__version__}")
        print(f"{'benchmark':<26} {'size':<26} {'ms':>9} {'':>16} {'':>14}")
        for name, size, ms, a, b in bench_rows:
            print(f"{name:<26} {size:<26} {ms:>9.3f} {a:>16} {b:>14}")
        broken = [row[0] for row in bench_rows if math.isnan(row[2])]
        detail = f"{len(bench_rows) - len(broken)}/{len(bench_rows)} timings (table above)"
        summary.append(
            Row(
                "benchmarks",
                "FAIL" if broken else "PASS",
                detail + (f"; failed: {', '.join(broken)}" if broken else ""),
                time.perf_counter() - bench_started,
            )
        )
    else:
        why = "--no-bench" if args.no_bench else "CUDA only"
        summary.append(Row("benchmarks", "SKIP", why))
    if not args.no_stack:
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the sections run in processes of their own
        budget = (
            args.budget if args.budget is not None else (CUDA_BUDGET_S if args.device == "cuda" else None)
        )
        left = None if budget is None else budget - (time.perf_counter() - started)
        summary += run_sections(SECTIONS, args.device, args.quick, budget=left)
    print_table(summary)
    bad = [row for row in summary if row.status == "FAIL"]
    print(f"gpu_check: {time.perf_counter() - started:.0f} s, {'FAILED' if bad else 'ok'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
