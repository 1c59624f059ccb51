"""Registers, spills, shared memory, occupancy and SASS cost of every Triton kernel variant, for
sm_80 (A100) and sm_90 (H100/H200), compiled ahead of time on a machine without a GPU.

How: a stand-in Triton driver reports GPUTarget("cuda", ARCH, 32), and kernel launches become
compile-only warm-ups, so the project's own launchers run on small CPU tensors with the real
vocabulary sizes, dtypes and flags and compile exactly the variants (signature, divisibility
specialisation, constexprs, block size, num_warps) they would launch on a GPU. ptxas (shipped in
the triton wheel under triton/backends/nvidia/bin) reports registers, spill bytes and static shared
memory; Triton's metadata gives the dynamic shared memory.

SASS instructions per element: the kernel's cubin is disassembled with `cuobjdump -sass`; every
backward branch (a `BRA` whose target address lies before it) closes a loop, and the loop body is
the instructions from the target to the branch (NOPs excluded). Loops nested inside another are
not counted again. Each loop iteration of these kernels handles one block, that is
BLOCK / (32 · num_warps) elements per thread, so
    SASS/elem = Σ(outermost loop bodies) / (BLOCK / (32 · num_warps)).
For the entropy kernels "element" is one logit; for segment rewards and GAE it is one token, and
a multi-pass kernel (segment rewards walks a row three times) sums its passes. This is an issue
count, not a timing: it ignores latency and dual issue, but it is what bounds a kernel that is not
memory-bound.

CTAs/SM (an estimate, from registers, shared memory and threads only): registers are allocated
per warp in units of 256, from 64K per SM; at most 2048 threads and 32 CTAs per SM; shared memory
per SM is 164 KiB (sm_80) or 228 KiB (sm_90), with 1 KiB reserved per CTA.

    python benchmarks/kernel_resources.py                  # table for sm_80 and sm_90
    python benchmarks/kernel_resources.py --arch 90 --merge     # equal vocabularies on one row
    python benchmarks/kernel_resources.py --no-sass --json out.json   # compile check only (CI)

Exits 1 if a variant fails to compile or spills. tests/test_kernel_compile.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# Compiling for a GPU needs the real JIT, never the interpreter; and a fresh cache, so that ptxas
# runs (and reports) for every variant rather than a stale cubin being reused.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="segppo-kernel-resources-"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default, stated (silences a warning)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

MODULES = ("entropy", "gae", "rewards")
# By module path: the package re-exports functions under the same names (segppo.kernels.gae is `gae`).
entropy, gae, rewards = (importlib.import_module(f"segppo.kernels.{name}") for name in MODULES)

VOCABS = (32000, 50257, 128256, 152064)  # Llama-2, GPT-2, Llama-3, Qwen2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ARCHS = (80, 90)
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class _CompileOnlyDriver:
    """The part of Triton's driver interface that compiling needs; the device id is the arch, so
    each target gets its own in-memory kernel cache."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class _Recorder:
    """Turns `kernel[grid](...)` into a compile, keeping each compiled kernel and its ptxas log."""

    def __init__(self):
        self.compiled = []  # (kernel, ptxas log) of the current variant
        self.logs = {}  # kernel hash -> ptxas log: an in-memory cache hit compiles nothing

    def __enter__(self):
        self._saved = triton_jit.KernelInterface.__getitem__
        recorder = self

        def compile_only(kernel_fn, grid):
            def launch(*args, **kwargs):
                log = io.StringIO()
                with contextlib.redirect_stdout(log):  # ptxas -v output, printed by Triton
                    kernel = kernel_fn.run(*args, grid=grid, warmup=True, **kwargs)
                key = kernel.metadata.hash
                recorder.logs.setdefault(key, log.getvalue())
                recorder.compiled.append((kernel, recorder.logs[key]))
                return kernel

            return launch

        triton_jit.KernelInterface.__getitem__ = compile_only
        triton.knobs.nvidia.dump_ptxas_log = True
        return self

    def __exit__(self, *exc):
        triton_jit.KernelInterface.__getitem__ = self._saved
        triton.knobs.nvidia.dump_ptxas_log = False


def variants():
    """(tag, launch) for every variant the launchers compile; rows only set the grid, so 2 suffice."""
    rows = 2
    targets = torch.zeros(rows, dtype=torch.int64)
    stats = torch.zeros(rows, 3)  # float32 per-row statistics; the backward only needs their dtype
    grad = torch.zeros(rows)
    for name, dtype in DTYPES.items():
        for vocab in VOCABS:
            x = torch.zeros(rows, vocab, dtype=dtype)
            for has_targets in (True, False):
                t = targets if has_targets else None
                yield (
                    f"entropy_fwd {name} V={vocab} targets={int(has_targets)}",
                    lambda x=x, t=t: entropy.entropy_logprobs_forward(x, t, 1.0),
                )
            for grad_h, grad_lp in ((True, True), (True, False), (False, True)):
                gh, gl = grad if grad_h else None, grad if grad_lp else None
                yield (
                    f"entropy_bwd {name} V={vocab} dH={int(grad_h)} dlogp={int(grad_lp)}",
                    lambda x=x, gh=gh, gl=gl: entropy.entropy_logprobs_backward(x, targets, stats, gh, gl, 1),
                )
    # PPO's layout: rm_values = values[:, P:] of [B, P + T], entropy = entropy[:, 1:] of [B, T + 1]
    # (neither 16-byte aligned nor of a round row stride); RM training hands bf16 scores.
    prompt = 37
    for length in (2048, 100):  # BLOCK_T = 1024 (the cap) and 128
        mask = torch.ones(rows, length, dtype=torch.bool)
        ent = torch.zeros(rows, length + 1)[:, 1:]
        for rm_name in ("fp32", "bf16"):
            rm = torch.zeros(rows, prompt + length, dtype=DTYPES[rm_name])[:, prompt:]
            every_combination = length == 2048 and rm_name == "fp32"
            for granularity in ("segment", "token", "bandit"):
                for distribute in ("interpolate", "repeat", "end") if granularity != "bandit" else ("end",):
                    for normalizer in (None, (0.1, 0.2, 0.3, 1.0)):
                        default = (granularity, distribute, normalizer) == ("segment", "interpolate", None)
                        if not (every_combination or default):
                            continue
                        yield (
                            f"segment_rewards {rm_name} T={length} {granularity} {distribute} "
                            f"norm={int(normalizer is not None)}",
                            lambda rm=rm, m=mask, e=ent, g=granularity, d=distribute, n=normalizer: (
                                rewards._segment_rewards_triton(rm, e, m, g, 2.0, None, n, 1e-2, d)
                            ),
                        )
                if every_combination or granularity == "segment":
                    yield (
                        f"sequence_scores {rm_name} T={length} {granularity}",
                        lambda rm=rm, m=mask, e=ent, g=granularity: rewards._sequence_scores_triton(
                            rm, e, m, g, 2.0, None
                        ),
                    )
        for name in ("fp32", "bf16") if length == 2048 else ("fp32",):
            r = torch.zeros(rows, length, dtype=DTYPES[name])
            yield f"gae {name} T={length}", lambda r=r, m=mask: gae._gae_triton(r, r, m, 1.0, 0.95)
    short = torch.ones(rows, 10, dtype=torch.bool)  # BLOCK_T = 16, one warp
    yield "gae fp32 T=10", lambda m=short: gae._gae_triton(m.float(), m.float(), m, 1.0, 0.95)


def parse_ptxas(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    smem = re.search(r"(\d+) bytes smem", log)
    if not (regs and spills):
        raise RuntimeError(f"no ptxas register/spill report in the compile log:\n{log[-2000:]}")
    return {
        "regs": int(regs.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "stack": int(stack.group(1)) if stack else 0,
        "static_smem": int(smem.group(1)) if smem else 0,
    }


def ctas_per_sm(arch: int, regs: int, num_warps: int, smem: int) -> int:
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (65536 // regs_per_warp) // num_warps
    by_threads = 2048 // (32 * num_warps)
    by_smem = SMEM_PER_SM[arch] // (smem + 1024)
    return min(by_regs, by_threads, by_smem, 32)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_loops(cubin: bytes) -> dict:
    """Instructions of the outermost loops and what they contain, from `cuobjdump -sass`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run(
            [str(NVIDIA_BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    instrs = [(int(a, 16), op, rest) for a, _, op, rest in _SASS_LINE.findall(sass) if op != "NOP"]
    loops = []
    for addr, op, rest in instrs:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    nested = {(lo, hi) for lo, hi in loops for a, b in loops if a <= lo and hi <= b and (a, b) != (lo, hi)}
    outer = [loop for loop in loops if loop not in nested]
    body = [op for addr, op, _ in instrs if any(lo <= addr <= hi for lo, hi in outer)]
    return {
        "loops": len(outer),
        "loop_sass": len(body),
        "loop_ex2": sum(op.startswith("MUFU.EX2") for op in body),
        "loop_bar": sum(op.startswith("BAR") for op in body),
        "loop_shfl": sum(op.startswith("SHFL") for op in body),
        "vector_ldg": sorted({op for op in body if op.startswith("LDG")}),
        "kernel_sass": len(instrs),
    }


def block_size(kernel) -> int:
    src = kernel.src
    names = src.fn.arg_names
    for path, value in src.constants.items():
        if names[path[0]] in ("BLOCK_V", "BLOCK_T"):
            return int(value)
    raise RuntimeError(f"{kernel.metadata.name} has no BLOCK_V/BLOCK_T constexpr")


def measure(arch: int, with_sass: bool, only: str | None) -> list[dict]:
    driver.set_active(_CompileOnlyDriver(arch))
    results = []
    with _Recorder() as recorder:
        for tag, launch in variants():
            if only and only not in tag:
                continue
            recorder.compiled = []
            row = {"arch": arch, "variant": tag}
            try:
                launch()
                if len(recorder.compiled) != 1:
                    raise RuntimeError(f"expected one kernel launch, got {len(recorder.compiled)}")
                kernel, log = recorder.compiled[0]
                row["kernel"] = kernel.metadata.name
                row["num_warps"] = kernel.metadata.num_warps
                row["block"] = block_size(kernel)
                row.update(parse_ptxas(log))
                row["smem"] = row["static_smem"] + kernel.metadata.shared
                row["ctas_per_sm"] = ctas_per_sm(arch, row["regs"], row["num_warps"], row["smem"])
                row["elems_per_thread"] = row["block"] / (32 * row["num_warps"])
                if with_sass:
                    row.update(sass_loops(kernel.asm["cubin"]))
                    row["sass_per_elem"] = row["loop_sass"] / row["elems_per_thread"]
            except Exception as error:  # noqa: BLE001 - every failure is reported, then fails the run
                row["error"] = f"{type(error).__name__}: {error}"[:3000]
                traceback.print_exc()
            results.append(row)
    return results


def problems(results: list[dict]) -> list[str]:
    """One line per variant that failed to compile or spilled."""
    bad = []
    for r in results:
        if "error" in r:
            bad.append(f"sm_{r['arch']} {r['variant']}: {r['error'].splitlines()[0]}")
        elif r["spill_stores"] or r["spill_loads"] or r["stack"]:
            bad.append(
                f"sm_{r['arch']} {r['variant']}: spills {r['spill_stores']} B stores, "
                f"{r['spill_loads']} B loads, {r['stack']} B stack"
            )
    return bad


def merge_vocabularies(results: list[dict]) -> list[dict]:
    """One row per variant that differs only in V and compiled to the same figures (V = 32000,
    128256 and 152064 share a specialisation: all multiples of 16), the V's joined by '/'."""
    merged: dict[tuple, tuple[dict, list[str]]] = {}
    for r in results:
        vocab = re.search(r" V=(\d+)", r["variant"])
        figures = tuple(sorted((k, str(v)) for k, v in r.items() if k not in ("variant", "kernel_sass")))
        key = (re.sub(r" V=\d+", " V=*", r["variant"]), figures)
        merged.setdefault(key, (r, []))[1].append(vocab.group(1) if vocab else "")
    return [
        dict(r, variant=template.replace("V=*", "V=" + "/".join(vocabs)))
        for (template, _), (r, vocabs) in merged.items()
    ]


def markdown(results: list[dict]) -> str:
    head = (
        "| arch | variant | warps | BLOCK | regs | spill B | smem B | CTAs/SM | elem/thr/iter "
        "| loop SASS | SASS/elem | EX2 | BAR | SHFL | loads |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"| sm_{r['arch']} | {r['variant']} | compile error: {r['error'].splitlines()[0]} |")
            continue
        sass = (
            f"{r['loop_sass']} | {r['sass_per_elem']:.1f} | {r['loop_ex2']} | {r['loop_bar']} | "
            f"{r['loop_shfl']} | {' '.join(r['vector_ldg'])}"
            if "loop_sass" in r
            else "- | - | - | - | - | -"
        )
        lines.append(
            f"| sm_{r['arch']} | {r['variant']} | {r['num_warps']} | {r['block']} | {r['regs']} | "
            f"{r['spill_stores'] + r['spill_loads']} | {r['smem']} | {r['ctas_per_sm']} | "
            f"{r['elems_per_thread']:g} | {sass} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--only", help="only variants whose tag contains this text")
    parser.add_argument("--no-sass", action="store_true", help="skip the disassembly (compile check only)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--load", type=Path, help="print the rows a --json run wrote, compiling nothing")
    parser.add_argument("--merge", action="store_true", help="one row for vocabularies with equal figures")
    args = parser.parse_args(argv)
    if not (NVIDIA_BIN / "ptxas").exists():
        print(f"ptxas not found under {NVIDIA_BIN}", file=sys.stderr)
        return 2
    if args.load:
        results = [r for r in json.loads(args.load.read_text()) if r["arch"] in args.arch]
        results = [r for r in results if not args.only or args.only in r["variant"]]
    else:
        results = [r for arch in args.arch for r in measure(arch, not args.no_sass, args.only)]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"triton {triton.__version__}, torch {torch.__version__}, {len(results)} variants")
    print(markdown(merge_vocabularies(results) if args.merge else results))
    bad = problems(results)
    for line in bad:
        print("FAIL", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
