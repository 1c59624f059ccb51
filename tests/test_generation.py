"""`segppo.generation`: one generation module for PPO, eval and the demo (tiny model, CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from segppo.data import ChatFormat, PromptExample, collate_responses
from segppo.generation import HFEngine, SamplingConfig, cut_at_stop, cut_row_at_stop, stop_token_ids
from segppo.models import load_policy, load_tokenizer


def test_eval_imports_no_training_code_and_losses_no_communication():
    """Eval needs no trainer (nor DeepSpeed); PPO's losses take reduced statistics, not a process group."""
    code = (
        "import sys; import segppo.eval; print(' '.join(sys.modules)); "
        "import segppo.ppo.losses; assert 'segppo.distributed' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    modules = set(out.stdout.split())
    assert not {m for m in modules if m.startswith("segppo.ppo")}
    assert "deepspeed" not in modules and "segppo.distributed" not in modules


def test_chat_format_and_generation_cut_at_the_same_place(tiny_lm_dir):
    chat = ChatFormat(load_tokenizer(tiny_lm_dir))
    stop = chat.stop_token_ids[0]
    rows = [[5, 6, stop, 7, stop], [5, 6, 7, 8, 9], [stop, 1, 1, 1, 1]]
    cut, has_eos = cut_at_stop(torch.tensor(rows), chat.stop_token_ids)
    assert list(zip(cut, has_eos, strict=True)) == [chat.cut_at_stop(r) for r in rows]
    assert cut_row_at_stop([5, stop, 6], [stop]) == ([5, stop], True)


def test_stop_tokens_add_extra_tokens_once_and_refuse_unknown_ones(tiny_lm_dir):
    tokenizer = load_tokenizer(tiny_lm_dir)
    chat = ChatFormat(tokenizer)
    own = tuple(chat.stop_token_ids)
    extra = tokenizer.convert_ids_to_tokens(own[0])
    assert stop_token_ids(chat, tokenizer, [extra]) == own
    with pytest.raises(ValueError, match="not a single token"):
        stop_token_ids(chat, tokenizer, ["<no such token here>"])


def test_both_draws_give_the_response_layout(tiny_lm_dir):
    """Global-RNG (PPO) and per-row seeded (eval) draws: each row cut at its own first stop, collated."""
    tokenizer = load_tokenizer(tiny_lm_dir)
    chat = ChatFormat(tokenizer)
    engine = HFEngine(load_policy(tiny_lm_dir).eval(), chat.pad_token_id, "cpu")
    prompts = [chat.encode_prompt(PromptExample([{"role": "user", "content": t}])) for t in ("a b", "c")]
    sampling = SamplingConfig(max_new_tokens=6, stop_token_ids=tuple(chat.stop_token_ids))
    torch.manual_seed(0)
    for seeds in (None, [1, 2]):
        batch = engine.generate(prompts, sampling, seeds)
        lengths = batch.response_mask.sum(-1).tolist()
        responses = [row[:n] for row, n in zip(batch.response_ids.tolist(), lengths, strict=True)]
        for ids, eos in zip(responses, batch.has_eos.tolist(), strict=True):
            assert 1 <= len(ids) <= 6
            assert eos == (ids[-1] in sampling.stop_token_ids)
            assert not set(ids[:-1]) & set(sampling.stop_token_ids)
        again = collate_responses(
            [p.prompt_ids for p in prompts], responses, batch.has_eos.tolist(), chat.pad_token_id
        )
        assert torch.equal(again.input_ids, batch.input_ids) and torch.equal(
            again.position_ids, batch.position_ids
        )
    seeded = [engine.generate(prompts, sampling, [1, 2]).input_ids for _ in range(2)]
    assert torch.equal(*seeded)  # seeded draws need no RNG state
    with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
        engine.generate(prompts, sampling, [1])


def test_eval_generates_through_any_engine(tiny_lm_dir, tmp_path):
    """`generate_responses` takes an Engine in place of a model, with the same results."""
    from segppo.eval import generate_responses
    from segppo.eval.prompts import prompts_from_rows

    tokenizer = load_tokenizer(tiny_lm_dir)
    chat = ChatFormat(tokenizer)
    model = load_policy(tiny_lm_dir).eval()
    prompts, _ = prompts_from_rows([{"prompt": "a b"}, {"prompt": "c d e"}])
    sampling = SamplingConfig(max_new_tokens=5, stop_token_ids=tuple(chat.stop_token_ids))

    class Counting(HFEngine):
        calls = 0

        def generate(self, prompts, sampling, seeds=None):
            Counting.calls += 1
            return super().generate(prompts, sampling, seeds)

    direct = generate_responses(model, tokenizer, chat, prompts, sampling, num_samples=2, batch_size=3)
    engine = Counting(model, chat.pad_token_id, "cpu")
    through = generate_responses(engine, tokenizer, chat, prompts, sampling, num_samples=2, batch_size=3)
    assert Counting.calls == 2
    assert [g.response_ids for g in through] == [g.response_ids for g in direct]


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.8)])
def test_sampled_scores_are_what_a_forward_pass_gives(tiny_lm_dir, temperature, top_p):
    """`generate_scored` draws what `generate` draws, and its log-probs and entropy (which PPO takes
    instead of a forward pass of the actor in float32) equal that pass's on the finished responses,
    rows that stopped early included; top-p does not truncate them."""
    from segppo.ppo.rollout import sampled_logprobs_and_entropy

    tokenizer = load_tokenizer(tiny_lm_dir)
    chat = ChatFormat(tokenizer)
    model = load_policy(tiny_lm_dir).eval()
    engine = HFEngine(model, chat.pad_token_id, "cpu")
    texts = ("a b", "c", "d e f g", "h i", "j", "k l m")
    prompts = [chat.encode_prompt(PromptExample([{"role": "user", "content": t}])) for t in texts]
    # Many stop tokens, so that some rows stop early and others run to the limit.
    stops = (*chat.stop_token_ids, *range(100, 140))
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature, top_p=top_p, stop_token_ids=stops)
    torch.manual_seed(0)
    batch, scores = engine.generate_scored(prompts, sampling)
    torch.manual_seed(0)
    assert torch.equal(engine.generate(prompts, sampling).input_ids, batch.input_ids)
    lengths = batch.response_mask.sum(-1)
    assert batch.has_eos.any() and (lengths < lengths.max()).any()
    logprobs, entropy = sampled_logprobs_and_entropy(model, batch, temperature)
    mask = batch.response_mask
    torch.testing.assert_close(scores.logprobs, torch.where(mask, logprobs, 0.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.entropy, torch.where(mask, entropy, 0.0), rtol=1e-5, atol=1e-5)


def test_temperature_0_decodes_greedily_in_both_draws(tiny_lm_dir):
    """Temperature 0 is greedy decoding: Hugging Face's do_sample=False (the argmax at each step)
    whatever the draw (global RNG or per-row seeds, any seeds) and whatever top_p."""
    from segppo.data import collate_prompts
    from segppo.generation import responses_batch

    tokenizer = load_tokenizer(tiny_lm_dir)
    chat = ChatFormat(tokenizer)
    model = load_policy(tiny_lm_dir).eval()
    engine = HFEngine(model, chat.pad_token_id, "cpu")
    texts = ("Name the capital.", "What is the capital of France?", "a b")
    prompts = [chat.encode_prompt(PromptExample([{"role": "user", "content": t}])) for t in texts]
    stops = tuple(chat.stop_token_ids)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0, top_p=0.5, stop_token_ids=stops)
    torch.manual_seed(0)
    drawn = [engine.generate(prompts, sampling, seeds) for seeds in (None, [1, 2, 3], [7, 7, 9])]
    prompt_ids = [p.prompt_ids for p in prompts]
    batch = collate_prompts(prompt_ids, chat.pad_token_id)
    width = batch.input_ids.shape[1]
    plain = model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        do_sample=False,
        max_new_tokens=8,
        eos_token_id=list(stops),
        pad_token_id=chat.pad_token_id,
    )
    expected = responses_batch(prompt_ids, plain[:, width:], sampling, chat.pad_token_id)
    for got in drawn:
        assert torch.equal(got.input_ids, expected.input_ids)
    assert len({tuple(row) for row in expected.response_ids.tolist()}) == len(texts)  # not one answer


def test_sampling_at_temperature_0_is_recorded_as_greedy_and_has_no_log_probs(tiny_lm_dir):
    """Greedy decoding draws from no distribution: its record says greedy (top-p does not apply),
    and the log-probs PPO takes at the sampling temperature are refused rather than divided by 0."""
    greedy = SamplingConfig(max_new_tokens=4, temperature=0.0, top_p=0.9)
    assert greedy.greedy and not SamplingConfig(max_new_tokens=4).greedy
    described = greedy.describe()
    assert described["decoding"] == "greedy" and described["temperature"] == 0.0
    assert described["top_p"] is None and described["top_k"] is None
    assert SamplingConfig(max_new_tokens=4, top_p=0.9).describe()["decoding"] == "sampling"
    for temperature in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="temperature must be >= 0"):
            SamplingConfig(max_new_tokens=4, temperature=temperature)

    tokenizer = load_tokenizer(tiny_lm_dir)
    chat = ChatFormat(tokenizer)
    engine = HFEngine(load_policy(tiny_lm_dir).eval(), chat.pad_token_id, "cpu")
    prompts = [chat.encode_prompt(PromptExample([{"role": "user", "content": "a b"}]))]
    with pytest.raises(ValueError, match="no log-probs at temperature 0"):
        engine.generate_scored(prompts, greedy)
