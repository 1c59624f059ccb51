"""Peak host memory of full fine-tune PPO on the real model (SmolLM2-135M-Instruct), by part (issue 20).

One `segppo ppo train` run (full fine-tune of actor and critic, HF engine, one rank, the default
--zero-stage) in a fresh subprocess, on a segment RM made from the same model. The run is the
trainer itself; the subprocess only wraps the set-up functions and the step's phases to read
`/proc/self/status` around each (VmRSS; VmHWM, the peak RSS, reset to the current RSS just before
each by writing 5 to /proc/self/clear_refs):

  load   RSS added by each model load (RM, actor, critic, reference) and by each DeepSpeed engine
         (actor, critic: whatever DeepSpeed allocates when it wraps a model and its optimizer);
  phase  per PPO step, the peak RSS reached inside generation, scoring and training above the RSS
         at its start, and the RSS left after it (optimizer states appear at the first update).

Each row also splits the RSS after it into anonymous pages (RssAnon: what the process allocated)
and file-backed ones (RssFile: memory-mapped checkpoints and libraries, which count once read and
which the kernel may drop and read again).

The parts are then set against what they must cost: P parameters × 4 B for each float32 model,
× 4 B for gradients, × 8 B for AdamW's two moments.

    python benchmarks/bench_ppo_memory.py [--zero-stage N] [--steps N] [--json FILE]
    python -m pytest benchmarks/bench_ppo_memory.py -q -s        # the same, default sizes

Sizes: 8 prompts a rollout (micro-rollout 8), train batch 8 (micro 4), 48 new tokens, prompts of at
most 64 tokens; 2 steps. SEGPPO_BENCH_PPO_MEM_STEPS, _ROLLOUT, _NEW_TOKENS override them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024 / GB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _split() -> dict[str, float]:
    """The RSS by kind: anonymous (the process's own allocations) and file-backed (memory-mapped
    safetensors and libraries, which the kernel may drop and read again)."""
    return {"anon": _status("RssAnon"), "file": _status("RssFile")}


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class MemoryLog:
    """(what, RSS before, RSS after, peak RSS during) of each wrapped call or phase, in GB."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.depth = 0

    def measure(self, what: str, fn, *args, **kwargs):
        # Nested calls (a load inside a phase) reset the peak too: the outer row's peak is then
        # the larger of its own reading and its inner rows'.
        before = _status("VmRSS")
        _reset_peak()
        self.depth += 1
        start = len(self.rows)
        try:
            return fn(*args, **kwargs)
        finally:
            self.depth -= 1
            inner = [r["peak"] for r in self.rows[start:]]
            peak = max([_status("VmHWM"), *inner])
            self.rows.append(
                {"what": what, "depth": self.depth, "before": before, "after": _status("VmRSS"), "peak": peak}
                | _split()
            )


def _wrap(module, name: str, log: MemoryLog, label) -> None:
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        return log.measure(label(args, kwargs), original, *args, **kwargs)

    setattr(module, name, wrapped)


def run_measured(args) -> dict:
    """In this process: the PPO run with its loads and phases measured."""
    import contextlib

    import torch

    torch.set_num_threads(args.threads)
    import segppo.ppo.setup as setup
    import segppo.ppo.trainer as trainer
    from segppo.config import PPOConfig

    log = MemoryLog()
    loads = iter(["actor", "reference"])
    _wrap(setup, "load_policy", log, lambda a, k: f"load {next(loads)}")
    rm_loads = iter(["reward model", "critic (from the RM)"])
    _wrap(setup, "load_reward_model", log, lambda a, k: f"load {next(rm_loads)}")
    engines = iter(["actor", "critic"])
    _wrap(setup, "training_engine", log, lambda a, k: f"DeepSpeed engine + optimizer: {next(engines)}")
    step = {"n": 0}

    @contextlib.contextmanager
    def timed(timing, name):
        before = _status("VmRSS")
        _reset_peak()
        start = len(log.rows)
        with original_timed(timing, name):
            yield
        inner = [r["peak"] for r in log.rows[start:]]
        log.rows.append(
            {
                "what": f"step {step['n']} {name}",
                "depth": 0,
                "before": before,
                "after": _status("VmRSS"),
                "peak": max([_status("VmHWM"), *inner]),
            }
            | _split()
        )

    original_timed = trainer.timed
    trainer.timed = timed
    original_step = trainer.PPOTrainer.ppo_step

    def ppo_step(self, n):
        step["n"] = n + 1
        return original_step(self, n)

    trainer.PPOTrainer.ppo_step = ppo_step

    cfg = PPOConfig(
        policy=args.policy,
        reward_model=args.reward_model,
        prompts=args.prompts,
        output=args.output,
        max_prompt_len=64,
        max_new_tokens=args.new_tokens,
        rollout_batch_size=args.rollout,
        micro_rollout_batch_size=args.rollout,
        train_batch_size=args.rollout,
        micro_train_batch_size=max(1, args.rollout // 2),
        max_steps=args.steps,
        warmup_ratio=0.0,
        actor_lr=1e-6,
        critic_lr=1e-5,
        zero_stage=args.zero_stage,
        num_logged_samples=0,
        seed=0,
    )
    base = _status("VmRSS")
    start = time.perf_counter()
    _reset_peak()
    trainer._train(cfg, None)  # the trainer on this rank (one process, no launcher)
    peak = _status("VmHWM")  # since the last reset: the last phase; the rows hold the others
    params = _parameter_count(args.policy)
    return {
        "zero_stage": args.zero_stage,
        "steps": args.steps,
        "rollout": args.rollout,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "parameters": params,
        "rss_before_run_gb": base,
        "peak_rss_gb": max([peak, *(r["peak"] for r in log.rows)]),
        "rows": log.rows,
        "seconds": time.perf_counter() - start,
    }


def _parameter_count(folder: str) -> int:
    import math

    from safetensors import safe_open

    with safe_open(Path(folder) / "model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def prepare(work: Path) -> tuple[str, str, str]:
    """The real model, a segment RM trained 2 steps on its own samples, and the PPO prompts."""
    from segppo.config import RMConfig
    from segppo.demo.real_data import make_real_data
    from segppo.demo.smollm2 import smollm2_folder
    from segppo.rm.trainer import train_reward_model

    folder = smollm2_folder()
    rm, prompts = work / "rm", work / "data" / "prompts_train.jsonl"
    if (rm / "model").is_dir() and prompts.is_file():  # a --work folder of an earlier run
        return str(folder), str(rm), str(prompts)
    data = make_real_data(
        work, folder, pairs=8, eval_pairs=2, ppo_prompts=16, heldout_prompts=4, max_new_tokens=24
    )
    rm_config = RMConfig(
        model=str(folder),
        dataset=str(data.preferences),
        output=str(rm),
        max_steps=2,
        batch_size=4,
        micro_batch_size=4,
        max_len=96,
        max_prompt_len=64,
        zero_stage=0,
        warmup_ratio=0.0,
        lr=1e-5,
    )
    train_reward_model(rm_config)
    return str(folder), str(rm), str(data.prompts_train)


def table(result: dict) -> str:
    P = result["parameters"]
    w = P * 4 / GB
    lines = [
        f"ZeRO stage {result['zero_stage']}, {result['steps']} steps, rollout {result['rollout']}, "
        f"{result['new_tokens']} new tokens, {result['threads']} threads; P = {P / 1e6:.1f} M "
        f"(float32 weights {w:.2f} GB); peak RSS {result['peak_rss_gb']:.2f} GB "
        f"(RSS before the run {result['rss_before_run_gb']:.2f} GB); {result['seconds']:.0f} s",
        "",
        "| what | RSS added (GB) | peak above the start (GB) | RSS after (GB) | of it anonymous / file |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        indent = "  " * r["depth"]
        lines.append(
            f"| {indent}{r['what']} | {r['after'] - r['before']:+.2f} | {r['peak'] - r['before']:.2f} "
            f"| {r['after']:.2f} | {r.get('anon', float('nan')):.2f} / {r.get('file', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero-stage", type=int, default=None, help="default: PPOConfig's")
    parser.add_argument("--steps", type=int, default=int(os.environ.get("SEGPPO_BENCH_PPO_MEM_STEPS", 2)))
    parser.add_argument("--rollout", type=int, default=int(os.environ.get("SEGPPO_BENCH_PPO_MEM_ROLLOUT", 8)))
    parser.add_argument(
        "--new-tokens", type=int, default=int(os.environ.get("SEGPPO_BENCH_PPO_MEM_NEW_TOKENS", 48))
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--work", default=None, help="folder for the RM and data (default: a temp dir)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--reward-model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.zero_stage is None:
        from segppo.config import PPOConfig

        args.zero_stage = PPOConfig.__dataclass_fields__["zero_stage"].default
    if args.measure:
        result = run_measured(args)
        Path(args.json).write_text(json.dumps(result))
        return result
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        policy, rm, prompts = prepare(work)
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--measure", "--json", str(out), "--policy", policy,
                   "--reward-model", rm, "--prompts", prompts, "--output", str(Path(tmp) / "ppo"),
                   "--zero-stage", str(args.zero_stage), "--steps", str(args.steps),
                   "--rollout", str(args.rollout), "--new-tokens", str(args.new_tokens),
                   "--threads", str(args.threads)]  # fmt: skip
        # a fresh process of its own: none of this one's rank variables (its one-rank group holds the port)
        rank_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
        env = {k: v for k, v in os.environ.items() if k not in rank_vars}
        subprocess.run(command, check=True, env=env)
        result = json.loads(out.read_text())
    result["load_average"] = os.getloadavg()
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def test_ppo_memory_by_part(benchmark):
    result = benchmark.pedantic(main, args=([],), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "rows"})


if __name__ == "__main__":
    main()
