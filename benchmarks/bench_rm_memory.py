"""Peak memory of the segmenter's entropy (issue 3: "Entropy for segmentation adds <= 1
logits-sized buffer of peak memory per micro-batch").

One micro-batch of left-padded prompts and right-padded responses (`segppo.data` layout) goes
through a random-weight Llama whose logits dominate the memory (small hidden size, real vocabulary).
The yardstick is one logits buffer of the response part, `[B, T, V]` in the model's dtype.
Variants, in groups named "rm entropy memory <device> <dtype> B=.. P=.. T=.. V=..":

  segppo   `segppo.segments.segmenter_entropy`: only the T response columns go through the LM
           head (`logits_to_keep`), then `segppo.kernels.entropy_logprobs` (chunked on CPU, one
           pass in Triton on CUDA);
  naive    `model(...).logits.float().log_softmax(-1)` over all P+T columns, then the entropy of
           the response columns: what one writes without the kernel;
  forward  `segppo.segments.last_logits` alone: the model call that produces the response logits,
           i.e. the floor every way of computing the entropy pays.

Memory is measured, not estimated:
  CUDA  in process: after a full-size warm-up, `torch.cuda.reset_peak_memory_stats()` and
        `max_memory_allocated()` minus `memory_allocated()` before the call;
  CPU   each (variant, dtype) in a fresh subprocess (`python benchmarks/bench_rm_memory.py
        measure VARIANT DTYPE` prints the JSON): model and inputs built, one warm-up call on a tiny
        batch, then the peak RSS reset (`/proc/self/clear_refs` = 5) and the growth of VmHWM over
        VmRSS across one full-size call ("rss": everything the process touched, allocator slack
        and oneDNN scratch included); then a second call under `torch.profiler` with
        profile_memory=True, whose allocation events, summed in time order, give the exact peak of
        live tensor bytes ("tensor").
Each benchmark's extra_info holds the bytes and the ratios to the logits buffer; the timing is
recorded, never asserted. A table is printed at the end of the module, with what the entropy adds
on top of the model call (segppo minus forward).

Sizes: CPU B=8, P=64, T=256, V=32000, hidden 256, 2 layers, fp32 and bf16; CUDA B=8, P=256,
T=1024, V=128256, hidden 2048, 4 layers, bf16. Overrides: SEGPPO_BENCH_RM_B, _RM_P, _RM_T, _RM_V,
_RM_HIDDEN, _RM_LAYERS, _RM_DTYPES (e.g. "bfloat16,float32"); SEGPPO_BENCH_THREADS sets torch's
intra-op threads (default: torch's own choice).

    python -m pytest benchmarks/bench_rm_memory.py -q
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
import torch

from segppo.data import collate_responses
from segppo.segments import last_logits, segmenter_entropy

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _size(name: str, cpu: int, cuda: int) -> int:
    return int(os.environ.get(f"SEGPPO_BENCH_RM_{name}", cuda if CUDA else cpu))


B = _size("B", 8, 8)
P = _size("P", 64, 256)
T = _size("T", 256, 1024)
V = _size("V", 32000, 128256)
HIDDEN = _size("HIDDEN", 256, 2048)
LAYERS = _size("LAYERS", 2, 4)
DTYPES = os.environ.get("SEGPPO_BENCH_RM_DTYPES", "bfloat16" if CUDA else "float32,bfloat16").split(",")
DTYPES = [name.strip() for name in DTYPES]


def build_model(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=V,
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN * 8 // 3 // 64 * 64 or 64,
        num_hidden_layers=LAYERS,
        num_attention_heads=max(HIDDEN // 64, 1),
        num_key_value_heads=max(HIDDEN // 256, 1),
        max_position_embeddings=P + T,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(DEVICE).eval().requires_grad_(False)


def make_batch(b: int, p: int, t: int, seed: int = 0):
    """`b` rows with prompts of p/2..p tokens and responses of t/2..t tokens (the longest of each
    exactly p and t), collated as `segppo.data` does: prompts left-padded, responses right-padded."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(max(p // 2, 1), p + 1, (b,), generator=gen)
    response_lens = torch.randint(max(t // 2, 1), t + 1, (b,), generator=gen)
    prompt_lens[0], response_lens[0] = p, t
    prompts = [torch.randint(3, V, (int(n),), generator=gen).tolist() for n in prompt_lens]
    responses = [torch.randint(3, V, (int(n),), generator=gen).tolist() for n in response_lens]
    batch = collate_responses(prompts, responses, [True] * b, pad_token_id=0)
    return tuple(x.to(DEVICE) for x in (batch.input_ids, batch.attention_mask, batch.position_ids)), p


@torch.no_grad()
def segppo_entropy(model, inputs, prompt_len):
    return segmenter_entropy(model, *inputs, prompt_len)


@torch.no_grad()
def naive_entropy(model, inputs, prompt_len):
    input_ids, attention_mask, position_ids = inputs
    logp = (
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        .logits.float()
        .log_softmax(-1)[:, prompt_len:]
    )
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def forward_only(model, inputs, prompt_len):
    return last_logits(model, *inputs, inputs[0].shape[1] - prompt_len)


VARIANTS = {"segppo": segppo_entropy, "naive": naive_entropy, "forward": forward_only}


def logits_bytes(dtype: torch.dtype) -> int:
    return B * T * V * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# CPU measurement, run in a fresh process per variant


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _tensor_peak_bytes(run) -> int | None:
    """Peak live CPU tensor bytes allocated during `run()`, from torch.profiler's allocation events."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
    del out
    try:
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
    except AttributeError:  # private API; leave the figure out rather than guess
        return None
    events = []
    while stack:
        event = stack.pop()
        fields = event.extra_fields
        if event.tag == _EventType.Allocation and fields.device.type == "cpu":
            events.append((event.start_time_ns, fields.alloc_size, fields.ptr))
        stack.extend(event.children)
    live = peak = 0
    sizes: dict[int, int] = {}  # pointers allocated inside the window: frees of older ones don't count
    for _, size, ptr in sorted(events):
        if size > 0:
            sizes[ptr] = size
            live += size
            peak = max(peak, live)
        elif ptr in sizes:
            live -= sizes.pop(ptr)
    return peak


def measure_cpu(variant: str, dtype_name: str) -> dict:
    """Peak extra memory of one full-size call (this process should do nothing else)."""
    if "SEGPPO_BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["SEGPPO_BENCH_THREADS"]))
    os.environ["SEGPPO_KERNELS"] = "torch"  # the CPU path; Triton on CPU is only the interpreter
    fn = VARIANTS[variant]
    model = build_model(getattr(torch, dtype_name))
    inputs, prompt_len = make_batch(B, P, T)
    tiny, tiny_prompt = make_batch(1, 4, 4, seed=1)
    fn(model, tiny, tiny_prompt)  # warm-up: threads, lazy initialisation, oneDNN kernels
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kib("VmRSS")
    out = fn(model, inputs, prompt_len)
    rss = (_status_kib("VmHWM") - base) * 1024
    del out
    gc.collect()
    tensor = _tensor_peak_bytes(lambda: fn(model, inputs, prompt_len))
    return {"rss": rss, "tensor": tensor, "threads": torch.get_num_threads()}


def _measure_in_subprocess(variant: str, dtype_name: str) -> dict:
    env = dict(os.environ, SEGPPO_KERNELS="torch")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "measure", variant, dtype_name],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measurement of {variant}/{dtype_name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# CUDA measurement, in process


def measure_cuda(run) -> dict:
    run()  # warm-up at full size: Triton compilation, cuBLAS workspaces
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return {"rss": None, "tensor": peak, "threads": None}


# ---------------------------------------------------------------------------------------------
# the benchmarks


@pytest.fixture(scope="module")
def results(request):
    """Collects (median seconds, memory) per benchmark and prints a table at the end of the module."""
    found: dict[tuple[str, str], dict] = {}
    yield found
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not found:
        return

    def ratio(x, dtype_name):
        return "-" if x is None else f"{x / logits_bytes(getattr(torch, dtype_name)):.3f}"

    def mib(x):
        return "-" if x is None else f"{x / 2**20:.1f}"

    lines = [
        f"segmenter entropy on {DEVICE}: B={B}, P={P}, T={T}, V={V}, hidden {HIDDEN}, {LAYERS} layers",
        f"{'dtype':<9} {'variant':<8} {'median ms':>10} {'rss MiB':>9} {'rss/logits':>10} "
        f"{'tensor MiB':>10} {'tensor/logits':>13}",
    ]
    for (dtype_name, variant), got in found.items():
        median = "-" if got["median"] is None else f"{got['median'] * 1e3:.1f}"
        lines.append(
            f"{dtype_name:<9} {variant:<8} {median:>10} {mib(got['rss']):>9} "
            f"{ratio(got['rss'], dtype_name):>10} {mib(got['tensor']):>10} "
            f"{ratio(got['tensor'], dtype_name):>13}"
        )
    for dtype_name in DTYPES:
        seg, fwd = found.get((dtype_name, "segppo")), found.get((dtype_name, "forward"))
        if seg and fwd:
            for kind in ("rss", "tensor"):
                if seg[kind] is not None and fwd[kind] is not None:
                    lines.append(
                        f"{dtype_name}: entropy on top of the model call ({kind}): "
                        f"{ratio(seg[kind] - fwd[kind], dtype_name)} logits buffers"
                    )
    lines.append(
        "one logits buffer [B, T, V]: "
        + ", ".join(f"{d} {mib(logits_bytes(getattr(torch, d)))} MiB" for d in DTYPES)
    )
    with capture.global_and_fixture_disabled():  # module teardown output is captured otherwise
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


@pytest.fixture(scope="module", params=DTYPES)
def setup(request):
    dtype_name = request.param
    model = build_model(getattr(torch, dtype_name))
    inputs, prompt_len = make_batch(B, P, T)
    threads = torch.get_num_threads()
    if "SEGPPO_BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["SEGPPO_BENCH_THREADS"]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEGPPO_KERNELS", "triton" if CUDA else "torch")
        # The two entropies agree (checked once, outside the timing).
        got = segppo_entropy(model, inputs, prompt_len)
        want = naive_entropy(model, inputs, prompt_len)
        tol = 1e-4 if dtype_name == "float32" else 2e-3
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        del got, want
        yield dtype_name, model, inputs, prompt_len
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rm_entropy_memory(benchmark, results, setup, variant):
    dtype_name, model, inputs, prompt_len = setup
    fn = VARIANTS[variant]
    benchmark.group = f"rm entropy memory {DEVICE} {dtype_name} B={B} P={P} T={T} V={V}"

    def run():
        out = fn(model, inputs, prompt_len)
        if CUDA:
            torch.cuda.synchronize()
        return out

    memory = measure_cuda(run) if CUDA else _measure_in_subprocess(variant, dtype_name)
    benchmark(run)
    buffer = logits_bytes(getattr(torch, dtype_name))
    benchmark.extra_info.update(
        B=B,
        P=P,
        T=T,
        V=V,
        hidden=HIDDEN,
        layers=LAYERS,
        dtype=dtype_name,
        threads=memory["threads"] or torch.get_num_threads(),
        logits_bytes=buffer,
        peak_extra_rss_bytes=memory["rss"],
        peak_extra_tensor_bytes=memory["tensor"],
        peak_extra_rss_vs_logits=None if memory["rss"] is None else round(memory["rss"] / buffer, 4),
        peak_extra_tensor_vs_logits=(
            None if memory["tensor"] is None else round(memory["tensor"] / buffer, 4)
        ),
    )
    median = benchmark.stats.stats.median if benchmark.stats is not None else None
    results[(dtype_name, variant)] = dict(memory, median=median)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "measure" or sys.argv[2] not in VARIANTS:
        sys.exit(f"usage: {sys.argv[0]} measure {{{','.join(VARIANTS)}}} DTYPE")
    print(json.dumps(measure_cpu(sys.argv[2], sys.argv[3])))
