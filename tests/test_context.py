"""A model's context (issue 21 item 5): prompts plus new tokens must fit it, whichever engine runs.

vLLM refused a short-context model with a pydantic error where the HF engine ran past the model's
positions; now both engines and the preflight of `ppo train` and `eval` check one limit, read from
the model's transformers config, and say in one line what does not fit. (The vLLM engine's side is
in tests/test_vllm_engine.py.)
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tiny import save_tiny_lm, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM

from segppo.config import EvalConfig, PPOConfig
from segppo.context import ContextError, context_length, model_context
from segppo.generation import HFEngine, SamplingConfig
from segppo.preflight import check_ppo_train

CONTEXT = 256  # tests/tiny.py's max_position_embeddings (and GPT-2's n_positions)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("context_data") / "prompts.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"Name the capital, number {i}."}) + "\n" for i in range(8))
    )
    return str(path)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_the_context_is_what_the_transformers_config_gives():
    assert context_length(tiny_config("llama")) == (CONTEXT, "max_position_embeddings")
    assert context_length(tiny_config("gpt2", n_positions=64)) == (64, "n_positions")  # GPT-2's own name
    qwen = tiny_config("qwen2", max_position_embeddings=100)
    assert context_length(qwen) == (100, "max_position_embeddings")
    # a model whose config bounds no positions (a state-space model) has no limit to check
    assert context_length(AutoConfig.for_model("mamba", vocab_size=64, hidden_size=16)) is None


def test_model_context_reads_a_folder(tiny_lm_dir):
    context = model_context(tiny_lm_dir)
    assert (context.tokens, context.field) == (CONTEXT, "max_position_embeddings")
    context.check(200, 56, prompt="a prompt", new="max_new_tokens")  # exactly full: fits
    with pytest.raises(ContextError) as error:
        context.check(200, 57, prompt="a prompt", new="max_new_tokens")
    message = one_line(error)
    assert "257" in message and "256" in message and tiny_lm_dir in message


def test_the_vllm_engine_asks_for_at_most_the_models_context(tiny_lm_dir):
    """What `VLLMEngine` passes as vLLM's `max_model_len` (its build is tested in the vLLM venv)."""
    from segppo.vllm_engine import engine_context

    assert engine_context(tiny_lm_dir, 1040, False).tokens == CONTEXT  # vLLM refused 1040 > 256
    assert engine_context(tiny_lm_dir, None, False).tokens == CONTEXT
    smaller = engine_context(tiny_lm_dir, 100, False)  # a smaller KV cache per sequence, if asked
    assert (smaller.tokens, smaller.field) == (100, "max_model_len")


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_ppo_preflight_refuses_prompts_plus_new_tokens_beyond_the_policys_context(
    engine, tiny_lm_dir, prompts_file, tmp_path
):
    """The same one line for either rollout engine, before any model is loaded."""
    cfg = PPOConfig(
        policy=tiny_lm_dir,
        reward_model=tiny_lm_dir,  # preflight only looks for a model folder
        prompts=prompts_file,
        output=str(tmp_path / "run"),
        max_prompt_len=1024,
        max_new_tokens=16,
        rollout_engine=engine,
        zero_stage=0,
    )
    with pytest.raises(ContextError) as error:
        check_ppo_train(cfg)
    message = one_line(error)
    for part in ("--max-prompt-len 1024", "--max-new-tokens 16", "1040", "256", "max_position_embeddings"):
        assert part in message, message
    assert "--policy" in message
    fits = PPOConfig(**{**vars(cfg), "max_prompt_len": 240})  # 240 + 16 fits
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        with pytest.raises(ValueError, match="--rollout-engine vllm needs vLLM"):
            check_ppo_train(fits)  # what is left to say
    else:
        check_ppo_train(fits)


def test_ppo_preflight_checks_a_separate_reference_too(tmp_path, tiny_lm_dir, prompts_file):
    torch.manual_seed(0)
    short = tmp_path / "short_reference"
    AutoModelForCausalLM.from_config(tiny_config("llama", max_position_embeddings=64)).save_pretrained(short)
    cfg = PPOConfig(
        policy=tiny_lm_dir,
        reference=str(short),
        reward_model=tiny_lm_dir,
        prompts=prompts_file,
        output=str(tmp_path / "run"),
        max_prompt_len=64,
        max_new_tokens=8,
        zero_stage=0,
    )
    with pytest.raises(ContextError, match="--reference"):
        check_ppo_train(cfg)


def test_ppo_train_stops_at_the_preflight(tiny_lm_dir, prompts_file, tmp_path):
    """`train_ppo` refuses before it loads anything (today's code went on to load the models)."""
    from segppo.ppo.trainer import train_ppo

    cfg = PPOConfig(
        policy=tiny_lm_dir,
        reward_model=tiny_lm_dir,
        prompts=prompts_file,
        output=str(tmp_path / "run"),
        max_prompt_len=250,
        max_new_tokens=16,
        zero_stage=0,
    )
    with pytest.raises(ContextError, match="266 tokens"):
        train_ppo(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_hf_engine_refuses_a_batch_that_cannot_fit(tiny_lm_dir):
    """HF `generate` would run a RoPE model past its positions: the engine refuses as vLLM's does."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    engine = HFEngine(model, pad_token_id=0)
    sampling = SamplingConfig(max_new_tokens=16, stop_token_ids=(3,))
    prompts = [[5] * 10, [5] * 241]
    with pytest.raises(ContextError) as error:
        engine.generate(prompts, sampling, seeds=[1, 2])
    message = one_line(error)
    assert "241" in message and "257" in message and "256" in message
    batch = engine.generate([[5] * 10, [5] * 240], sampling, seeds=[1, 2])  # 240 + 16 fits
    assert batch.input_ids.shape[1] <= CONTEXT


def test_the_hf_engine_refuses_past_gpt2s_positions_in_one_line(tmp_path):
    """GPT-2 has learned positions: past n_positions HF fails deep inside the embedding lookup."""
    folder = save_tiny_lm(tmp_path / "gpt2", arch="gpt2")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with pytest.raises(ContextError, match="n_positions"):
        HFEngine(model, pad_token_id=0).generate([[5] * 250], SamplingConfig(max_new_tokens=8))


def test_eval_refuses_before_loading_a_policy(tiny_lm_dir, prompts_file, tmp_path):
    from segppo.eval import evaluate

    cfg = EvalConfig(
        policy=[tiny_lm_dir],
        prompts=prompts_file,
        output=str(tmp_path / "eval"),
        max_prompt_len=1024,
        max_new_tokens=1024,
    )
    with pytest.raises(ContextError) as error:
        evaluate(cfg, scorer_fn=lambda prompts, responses: [0.0] * len(responses), progress=False)
    message = one_line(error)
    assert "--max-prompt-len 1024" in message and "2048" in message
    assert not (tmp_path / "eval" / "results.json").exists()
