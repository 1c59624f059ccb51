"""`segppo eval`: statistics, seeded sampling, scoring, benchmark exports and the CLI (tiny models, CPU)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from segppo.cli.main import app
from typer.testing import CliRunner

from segppo.config import EvalConfig, RMConfig
from segppo.eval import evaluate, markdown_counts, mean_ci, policy_specs, win_outcomes, win_rate
from segppo.generation import hash32, row_seed, sample_token
from segppo.normalizer import Normalizer
from segppo.rm.trainer import train_reward_model

runner = CliRunner()

PROMPTS = ["Name the capital.", "What is the capital of France?", "Say a city.", "Which city?"]
GEN = dict(max_new_tokens=8, max_prompt_len=48, batch_size=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rm_dir(tiny_lm_dir, preferences_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_rm") / "run"
    train_reward_model(
        RMConfig(
            model=tiny_lm_dir,
            dataset=preferences_file,
            output=str(out),
            granularity="segment",
            lr=3e-3,
            batch_size=16,
            micro_batch_size=8,
            max_steps=4,
            max_len=64,
            max_prompt_len=32,
            zero_stage=0,
            eval_fraction=0.2,
            warmup_ratio=0.0,
            seed=0,
        )
    )
    return str(out)


@pytest.fixture(scope="module")
def other_policy(tmp_path_factory):
    """A second random policy: same tokenizer, other weights."""
    from tiny import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("policy_b") / "policy_b", seed=1)


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    files = {
        "prompts": _jsonl(
            root / "prompts.jsonl",
            [{"question_id": 100 + i, "prompt": p} for i, p in enumerate(PROMPTS)]
            + [
                {
                    "question_id": 200,
                    "prompt": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "A city?"},
                    ],
                }
            ],
        ),
        # MT-Bench question.jsonl: integer ids, two user turns as strings
        "mt_bench": _jsonl(
            root / "mt_bench.jsonl",
            [
                {"question_id": 81, "category": "writing", "turns": ["Name the capital.", "Now say a city."]},
                {"question_id": 82, "category": "roleplay", "turns": ["Which city?", "Why?"]},
            ],
        ),
        # Arena-Hard v0.1 question.jsonl: string ids, turns as {"content": ...}
        "arena": _jsonl(
            root / "arena.jsonl",
            [
                {
                    "question_id": f"328c149ed45a41c{i}",
                    "category": "arena-hard-v0.1",
                    "turns": [{"content": p}],
                }
                for i, p in enumerate(PROMPTS[:2])
            ],
        ),
        # AlpacaEval's evaluation set: instruction, reference output, generator, dataset
        "alpaca": _jsonl(
            root / "alpaca.jsonl",
            [
                {"instruction": p, "output": "ref", "generator": "gpt4_turbo", "dataset": "helpful_base"}
                for p in PROMPTS[:3]
            ],
        ),
    }
    return files


def length_scorer(prompts, responses):
    return [float(len(r)) for r in responses]


# -- pure statistics ---------------------------------------------------------------------------


def test_mean_ci_is_mean_plus_minus_1_96_standard_errors():
    m = mean_ci([1.0, 2.0, 3.0, 4.0])
    std = np.std([1, 2, 3, 4], ddof=1)
    assert m.mean == 2.5 and m.n == 4
    assert m.std == pytest.approx(std) and m.se == pytest.approx(std / 2)
    assert m.low == pytest.approx(2.5 - 1.96 * std / 2, abs=1e-3)
    assert m.high == pytest.approx(2.5 + 1.96 * std / 2, abs=1e-3)
    assert m.low < m.mean < m.high
    # several samples per prompt: the standard error is over prompts (cluster-robust)
    g = mean_ci([1.0, 1.0, 3.0, 3.0], groups=[0, 0, 1, 1])
    assert g.mean == 2.0 and g.se == pytest.approx(1.0)  # std of the group means (1, 3) / √2
    one = mean_ci([5.0])
    assert one.mean == 5.0 and math.isnan(one.se) and one.to_dict()["se"] is None
    with pytest.raises(ValueError):
        mean_ci([1.0, float("nan")])


def test_win_rate_counts_ties_half():
    a, b = [3.0, 1.0, 2.0, 2.0], [1.0, 2.0, 2.0, 0.0]  # win, loss, tie, win
    w = win_rate(a, b)
    assert w.rate == pytest.approx(0.625)
    assert (w.wins, w.ties, w.losses, w.n) == (2, 1, 1, 4)
    assert w.se == pytest.approx(np.std([1, 0, 0.5, 1], ddof=1) / 2)
    assert win_outcomes(a, b).tolist() == [1.0, 0.0, 0.5, 1.0]
    # identical responses are ties whatever their scores' last bits
    forced = win_rate([1.0 + 1e-7, 2.0], [1.0, 1.0], same=[True, False])
    assert (forced.wins, forced.ties) == (1, 1) and forced.rate == 0.75
    same = win_rate([0.3, -1.0, 2.0], [0.3, -1.0, 2.0])
    assert same.rate == 0.5 and same.ties == 3 and same.se == 0.0
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0, 2.0], [1.0])


# -- seeded sampling ---------------------------------------------------------------------------


def test_hash_is_32_bit_and_seeds_differ():
    x = hash32(torch.arange(1000, dtype=torch.int64) * 7919 + 2**32 - 500)
    assert int(x.min()) >= 0 and int(x.max()) < 2**32 and len(set(x.tolist())) == 1000
    assert x.tolist() == [hash32(i * 7919 + 2**32 - 500) for i in range(1000)]  # tensors and ints agree
    seeds = {row_seed(42, i, s, t) for i in range(20) for s in range(3) for t in range(2)}
    assert len(seeds) == 120
    assert row_seed(42, 1, 0, 0) == row_seed(42, 1, 0, 0) != row_seed(43, 1, 0, 0)


def test_seeded_sampling_draws_from_the_tempered_nucleus():
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    temperature, top_p = 0.8, 0.9
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    expected = torch.softmax(warped, -1)[0].numpy()
    n = 20000
    seeds = torch.tensor([row_seed(7, i) for i in range(n)])
    draws = sample_token(logits.expand(n, -1), seeds, step=3, temperature=temperature, top_p=top_p)
    freq = np.bincount(draws.numpy(), minlength=6) / n
    assert np.abs(freq - expected).max() < 0.015, (freq, expected)
    assert freq[expected == 0].sum() == 0  # never outside the nucleus
    # a row's draw depends on its own seed and step only, not on the rest of the batch
    alone = sample_token(logits.expand(5, -1), seeds[:5], step=3, temperature=temperature, top_p=top_p)
    assert alone.tolist() == draws[:5].tolist()
    other_step = sample_token(logits.expand(n, -1), seeds, step=4, temperature=temperature, top_p=top_p)
    assert (other_step != draws).any()


def test_generations_do_not_depend_on_the_batch_size(tiny_lm_dir, data):
    from segppo.data import ChatFormat
    from segppo.eval import generate_responses, load_eval_prompts
    from segppo.generation import SamplingConfig
    from segppo.models import load_policy, load_tokenizer

    tokenizer = load_tokenizer(tiny_lm_dir)
    chat = ChatFormat(tokenizer)
    model = load_policy(tiny_lm_dir).eval()
    prompts, _ = load_eval_prompts(data["prompts"])
    sampling = SamplingConfig(max_new_tokens=8, stop_token_ids=tuple(chat.stop_token_ids))
    runs = [
        generate_responses(model, tokenizer, chat, prompts, sampling, num_samples=2, batch_size=b, seed=3)
        for b in (1, 4)
    ]
    assert [g.response_ids for g in runs[0]] == [g.response_ids for g in runs[1]]
    assert [(g.prompt.id, g.sample) for g in runs[0]][:3] == [(100, 0), (100, 1), (101, 0)]
    # samples of one prompt differ from each other
    assert len({tuple(g.response_ids) for g in runs[0] if g.prompt.id == 100}) == 2


def test_seeded_sampling_at_temperature_0_takes_the_argmax():
    """Temperature 0 adds no noise (and divides by nothing): every seed and step draws the argmax,
    top-p or not."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    seeds = torch.tensor([row_seed(7, i) for i in range(64)])
    for step, top_p in ((0, 1.0), (5, 0.3)):
        draws = sample_token(logits, seeds, step=step, temperature=0.0, top_p=top_p)
        assert draws.tolist() == logits.argmax(-1).tolist()


# -- end to end --------------------------------------------------------------------------------


def _argmax_continuation(model, prompt_ids: list[int], stops, max_new_tokens: int) -> list[int]:
    """Greedy decoding one token at a time on the unpadded prompt, up to the first stop token."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token in stops:
            break
    return ids[len(prompt_ids) :]


def test_eval_at_temperature_0_gives_the_argmax_continuation_for_any_seed(tiny_lm_dir, data, tmp_path):
    """`--temperature 0` decodes greedily: each response is the step-by-step argmax of its prompt
    (left padding and batching change nothing), the seed changes nothing, and the report says
    greedy rather than claiming a top-p it did not apply."""
    from segppo.data import ChatFormat
    from segppo.generation import stop_token_ids
    from segppo.models import load_policy, load_tokenizer

    runs = []
    for seed in (1, 2):
        cfg = EvalConfig(
            policy=[tiny_lm_dir],
            name=["sft"],
            prompts=data["prompts"],
            output=str(tmp_path / f"seed{seed}"),
            temperature=0.0,
            top_p=0.9,
            seed=seed,
            plot=False,
            **GEN,
        )
        runs.append(evaluate(cfg, scorer_fn=length_scorer, progress=False))
    first, second = (run.policies["sft"].generations for run in runs)
    assert [g.response_ids for g in first] == [g.response_ids for g in second]

    tokenizer = load_tokenizer(tiny_lm_dir)
    stops = set(stop_token_ids(ChatFormat(tokenizer), tokenizer, None))
    model = load_policy(tiny_lm_dir).eval()
    for g in first:
        assert g.response_ids == _argmax_continuation(model, g.prompt_ids, stops, GEN["max_new_tokens"])
    assert len({tuple(g.response_ids) for g in first}) > 1  # the prompts are answered, not ignored

    saved = json.loads((tmp_path / "seed1" / "results.json").read_text())
    assert saved["config"]["temperature"] == 0.0
    sampling = saved["policies"]["sft"]["sampling"]
    assert sampling["decoding"] == "greedy" and sampling["temperature"] == 0.0 and sampling["top_p"] is None
    assert "--top-p 0.9 was not applied: --temperature 0 decodes greedily" in saved["notes"]
    assert "greedy" in runs[0].table().title


def test_eval_with_a_reward_model(tiny_lm_dir, other_policy, rm_dir, data, tmp_path):
    # a normalizer without location terms makes the PPO reward checkable: Σ_k (r_k − c)/d = K(s − c)/d
    c, d = 0.25, 2.0
    normalizer = Normalizer((0.0, 0.0, c, d), source="fit").save(tmp_path / "normalizer.json")
    cfg = EvalConfig(
        policy=[tiny_lm_dir, other_policy, tiny_lm_dir],
        name=["sft", "other", "sft_again"],
        prompts=data["prompts"],
        output=str(tmp_path / "out"),
        reward_model=rm_dir,
        normalizer=str(normalizer),
        num_samples=2,
        seed=5,
        **GEN,
    )
    results = evaluate(cfg, progress=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results.to_dict()))
    assert saved["baseline"] == "sft" and list(saved["policies"]) == ["sft", "other", "sft_again"]
    assert saved["scorer"]["kind"] == "reward_model" and saved["scorer"]["normalizer"] == [0.0, 0.0, c, d]
    assert saved["prompts"]["count"] == 5 and saved["num_samples"] == 2
    for name, p in saved["policies"].items():
        assert p["responses"] == 10
        for key in ("score", "normalized_reward"):
            low, high = p[key]["ci95"]
            assert low < p[key]["mean"] < high, (name, key)
        low, high = p["response_length"]["ci95"]
        assert low <= p["response_length"]["mean"] <= high <= GEN["max_new_tokens"]
        assert 0 <= p["eos_fraction"] <= 1 and p["segments"] >= 1 and p["segment_length"] >= 1
        assert p["chat_template_source"] == "reward model" and p["scored_as_generated"] is True
        assert p["chat_template_kwargs"] is None
        assert p["sampling"]["decoding"] == "sampling" and p["sampling"]["top_p"] == 1.0
    assert saved["policies"]["sft"]["win_rate"] is None  # the baseline itself
    again = saved["policies"]["sft_again"]["win_rate"]
    assert again["rate"] == 0.5 and again["ties"] == again["n"] == 10 and again["se"] == 0.0
    other = saved["policies"]["other"]["win_rate"]
    assert other["wins"] + other["ties"] + other["losses"] == 10 and 0 <= other["rate"] <= 1
    # the same policy with the same seeds gives the same responses and scores
    a, b = results.policies["sft"], results.policies["sft_again"]
    assert [g.turns for g in a.generations] == [g.turns for g in b.generations]
    assert a.score.mean == b.score.mean
    for g in a.generations:
        assert g.normalized_reward == pytest.approx(g.num_segments * (g.score - c) / d, rel=1e-4, abs=1e-4)
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "responses" / "other.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 10 and {r["prompt_id"] for r in rows} == {100, 101, 102, 103, 200}
    assert rows[0]["score"] == results.policies["other"].generations[0].score
    assert saved["plot"] == "score_distributions.png"
    assert (tmp_path / "out" / "score_distributions.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "arena_hard" / "model_answer" / "sft_again.jsonl").is_file()
    table = results.table()
    assert table.row_count == 3
    # whole at 80 columns (a log file's width): every cell on one line, none cut
    from test_cli_tables import assert_whole, rendered

    assert_whole(table, rendered(table))


def test_results_name_the_segmenter_that_segmented(tiny_lm_dir, rm_dir, data, tmp_path, monkeypatch):
    """--segmenter replaces the one the RM's segppo.json records (moved, or another copy): the
    scorer's record in results.json names the model that gave the segments, not the recorded one."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_lm_dir, tmp_path / "segmenter")
    cfg = EvalConfig(
        policy=[tiny_lm_dir],
        prompts=data["prompts"],
        output="out",
        reward_model=rm_dir,
        segmenter="segmenter",
        max_samples=2,
        **GEN,
    )
    evaluate(cfg, progress=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["scorer"]["segmenter"] == str(tmp_path / "segmenter")


def test_a_policy_in_another_format_is_re_encoded_for_the_reward_model(tiny_lm_dir, rm_dir, data, tmp_path):
    from segppo.data import DEFAULT_CHAT_TEMPLATE, collate_responses
    from segppo.rm.scoring import load_scorer

    cfg = EvalConfig(
        policy=[tiny_lm_dir],
        prompts=data["prompts"],
        output=str(tmp_path),
        reward_model=rm_dir,
        chat_template=DEFAULT_CHAT_TEMPLATE,  # the RM was trained on the tokenizer's ChatML
        **GEN,
    )
    (result,) = evaluate(cfg, progress=False).policies.values()
    assert result.chat_template_source == "--chat-template" and result.scored_as_generated is False
    scorer = load_scorer(rm_dir)
    assert scorer.tokenizer.decode(result.generations[0].prompt_ids).startswith("User: Name the capital.")
    for g in result.generations[:2]:
        prompt = scorer.chat.prompt_ids(g.messages)
        response, has_eos = scorer.chat.response_ids(g.messages, g.response, prompt_ids=prompt)
        if not g.has_eos:  # a cut-off generation is scored without an end of turn
            response, has_eos = response[:-1], False
        batch = collate_responses([prompt], [response], [has_eos], scorer.chat.pad_token_id)
        assert g.score == pytest.approx(scorer.score(batch).scores.item(), abs=1e-4)
        assert g.scored_tokens == len(response)


def test_cli_with_a_python_scorer(tiny_lm_dir, other_policy, data, tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        "def by_length(prompts, responses):\n"
        "    assert all(isinstance(p, (str, list)) for p in prompts)\n"
        "    return [float(len(r)) for r in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    args = ["eval", "--policy", other_policy, "--policy", tiny_lm_dir, "--baseline", tiny_lm_dir]
    args += ["--prompts", data["prompts"], "--output", str(out), "--scorer", "my_scorers:by_length"]
    args += ["--max-new-tokens", "8", "--max-prompt-len", "48", "--json"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = json.loads(result.stdout)
    assert saved["scorer"] == {"kind": "callable", "scorer": "my_scorers:by_length"}
    base = Path(tiny_lm_dir).name
    assert saved["baseline"] == base  # named by its path
    for name in ("policy_b", base):
        rows = [json.loads(x) for x in (out / "responses" / f"{name}.jsonl").read_text().splitlines()]
        lengths = [len(r["response"]) for r in rows]
        assert saved["policies"][name]["score"]["mean"] == pytest.approx(np.mean(lengths))
        assert saved["policies"][name]["normalized_reward"] is None
    assert saved["policies"]["policy_b"]["win_rate"]["n"] == 5
    # the table, and off a terminal one-line progress records of the responses generated
    result = runner.invoke(app, args[:-1], env={"SEGPPO_PROGRESS_INTERVAL": "0"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "policy_b" in result.stdout and "win rate" in result.stdout and "results.json" in result.stdout
    from test_progress import records

    lines = records(result.output, "eval")
    assert lines[-1]["done"] == lines[-1]["total"] == "10" and lines[-1]["unit"] == "responses"
    assert float(lines[-1]["rate"]) > 0 and len(lines) > 2


def test_two_turn_mt_bench_export(tiny_lm_dir, data, tmp_path):
    seen = []

    def scorer(prompts, responses):
        seen.extend(prompts)
        return [0.0] * len(responses)

    cfg = EvalConfig(
        policy=[tiny_lm_dir],
        name=["sft"],
        prompts=data["mt_bench"],
        output=str(tmp_path),
        turns=2,
        num_samples=2,
        **GEN,
    )
    results = evaluate(cfg, scorer_fn=scorer, progress=False)
    # the scorer sees the whole conversation before the final turn
    assert all(isinstance(p, list) and [m["role"] for m in p] == ["user", "assistant", "user"] for p in seen)
    assert seen[0][2]["content"] == "Now say a city."
    g = results.policies["sft"].generations[0]
    assert len(g.turns) == 2 and g.messages[1]["content"] == g.turns[0]
    rows = [
        json.loads(x) for x in (tmp_path / "mt_bench" / "model_answer" / "sft.jsonl").read_text().splitlines()
    ]
    assert [r["question_id"] for r in rows] == [81, 82]
    for row in rows:
        assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert (
            row["model_id"] == "sft"
            and isinstance(row["answer_id"], str)
            and isinstance(row["tstamp"], float)
        )
        assert [c["index"] for c in row["choices"]] == [0, 1]
        for choice in row["choices"]:
            assert set(choice) == {"index", "turns"}
            assert len(choice["turns"]) == 2 and all(isinstance(t, str) for t in choice["turns"])
    assert rows[0]["choices"][1]["turns"] == results.policies["sft"].generations[1].turns
    assert not (tmp_path / "alpaca_eval").exists() and not (tmp_path / "arena_hard").exists()


def test_arena_hard_and_alpaca_eval_exports(tiny_lm_dir, data, tmp_path):
    cfg = EvalConfig(
        policy=[tiny_lm_dir],
        name=["sft"],
        prompts=data["arena"],
        output=str(tmp_path / "a"),
        num_samples=2,
        **GEN,
    )
    results = evaluate(cfg, scorer_fn=length_scorer, progress=False)
    lines = (tmp_path / "a" / "arena_hard" / "model_answer" / "sft.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["question_id"] for r in rows] == ["328c149ed45a41c0", "328c149ed45a41c1"]
    for row in rows:
        assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp", "conv_metadata"}
        assert row["model_id"] == "sft" and len(row["choices"]) == 2
        for i, choice in enumerate(row["choices"]):
            assert set(choice) == {"index", "turns"} and choice["index"] == i
            (turn,) = choice["turns"]
            assert set(turn) == {"content", "token_len"}
            assert isinstance(turn["content"], str) and isinstance(turn["token_len"], int)
        assert set(row["conv_metadata"]) == {"token_len", "header_count", "list_count", "bold_count"}
        assert set(row["conv_metadata"]["list_count"]) == {"ordered", "unordered"}
    assert rows[0]["choices"][0]["turns"][0]["content"] == results.policies["sft"].generations[0].response
    assert (tmp_path / "a" / "alpaca_eval" / "sft" / "model_outputs.json").is_file()

    cfg = EvalConfig(
        policy=[tiny_lm_dir], name=["sft"], prompts=data["alpaca"], output=str(tmp_path / "b"), **GEN
    )
    results = evaluate(cfg, scorer_fn=length_scorer, progress=False)
    outputs = json.loads((tmp_path / "b" / "alpaca_eval" / "sft" / "model_outputs.json").read_text())
    assert isinstance(outputs, list) and len(outputs) == 3
    for row, prompt, g in zip(outputs, PROMPTS, results.policies["sft"].generations, strict=False):
        assert set(row) == {"instruction", "output", "generator", "dataset"}
        assert row["instruction"] == prompt and row["generator"] == "sft" and row["dataset"] == "helpful_base"
        assert row["output"] == g.response


def test_markdown_counts_skip_code_blocks():
    text = "# Title\n## Part\n- one\n* two\n1. first\n**bold** and __also__\n```\n# not a header\n- no\n```\n"
    counts = markdown_counts(text)
    assert counts["header_count"] == {"h1": 1, "h2": 1, "h3": 0, "h4": 0, "h5": 0, "h6": 0}
    assert counts["list_count"] == {"ordered": 1, "unordered": 2}
    assert counts["bold_count"] == {"**": 1, "__": 1}


# -- names, configs and errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(temperature=-0.5), "--temperature must be >= 0 (0 decodes greedily), got -0.5"),
        (dict(temperature=float("nan")), "--temperature must be a number, got nan"),
        (dict(temperature=0.0, num_samples=3), "--num-samples 3 with --temperature 0: greedy decoding"),
    ],
)
def test_temperatures_that_cannot_work_are_refused(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EvalConfig(policy=["p"], prompts="x", output="o", **options)


def test_temperature_0_is_accepted_with_one_sample():
    cfg = EvalConfig(policy=["p"], prompts="x", output="o", temperature=0.0, top_p=0.5)
    assert cfg.temperature == 0.0 and cfg.num_samples == 1


def test_policy_names_and_baseline(tmp_path):
    def specs(**kw):
        values = dict(prompts="p.jsonl", output="o", scorer="m:f") | kw
        found, baseline = policy_specs(EvalConfig(**values))
        return [s.name for s in found], baseline

    assert specs(policy=["a/model", "b/model", "runs/ppo/policy"]) == (["model", "model-2", "ppo"], "model")
    assert specs(policy=["x/sft"]) == (["sft"], None)
    assert specs(policy=["x/sft", "x/ppo"], baseline="ppo") == (["sft", "ppo"], "ppo")
    assert specs(policy=["x/ppo"], baseline="y/sft") == (["sft", "ppo"], "sft")  # evaluated too
    assert specs(policy=["x/a", "x/b"], name=["A", "B"], baseline="x/b") == (["A", "B"], "B")
    # the baseline is the policy named, not the first of those sharing its default name
    assert specs(policy=["a/model", "b/model"], baseline="b/model") == (["model", "model-2"], "model-2")
    # a baseline evaluated too keeps a default name, made safe for files and apart from --name's
    assert specs(policy=["runs/ppo"], name=["sft"], baseline="models/sft") == (["sft-2", "sft"], "sft-2")
    assert specs(policy=["runs/ppo"], name=["ppo"], baseline="models/my sft") == (["my_sft", "ppo"], "my_sft")
    with pytest.raises(ValueError, match="unique"):
        specs(policy=["x/a", "x/b"], name=["A", "A"])
    with pytest.raises(ValueError, match="one --name per --policy"):
        EvalConfig(policy=["x/a", "x/b"], name=["A"], prompts="p", output="o")
    with pytest.raises(ValueError, match="neither a policy name"):
        specs(policy=["x/a"], baseline="nope")


def test_a_policy_given_as_dot_is_named_by_its_folder(tmp_path, monkeypatch):
    """`--policy .` (or `..`) names the folder it stands for: the name is the model id of every
    export and the name of its files (`arena_hard/model_answer/..jsonl` is a hidden file)."""
    (tmp_path / "runs" / "ppo" / "policy").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "runs" / "ppo" / "policy")
    cfg = EvalConfig(policy=[".", ".."], prompts="p.jsonl", output="o", scorer="m:f")
    assert [s.name for s in policy_specs(cfg)[0]] == ["ppo", "ppo-2"]


def test_note_when_a_policy_was_trained_on_the_eval_prompts(tiny_lm_dir, data, tmp_path):
    import shutil

    from segppo.models import SegppoMetadata

    policy = tmp_path / "ppo_run" / "policy"
    shutil.copytree(tiny_lm_dir, policy)
    meta = SegppoMetadata(kind="policy", data={"prompts": data["prompts"], "split": "train"})
    (policy / "segppo.json").write_text(meta.to_json())
    cfg = EvalConfig(
        policy=[str(tmp_path / "ppo_run")], prompts=data["prompts"], output=str(tmp_path / "o"), **GEN
    )
    results = evaluate(cfg, scorer_fn=length_scorer, progress=False)
    assert list(results.policies) == ["ppo_run"]  # a run folder stands for its policy/
    assert any("trained with PPO on these prompts" in note for note in results.notes)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reward-model", "rm", "--scorer", "m:f"], "not both"),
        ([], "pass a scorer"),
        (["--scorer", "no_such_module_xyz:f"], "cannot import module"),
        (["--scorer", "json:no_such_function"], "has no attribute"),
        (["--scorer", "json"], "module:function"),
        (["--scorer", "my_scorers_bad:wrong_length"], "returned 1 scores for 5 responses"),
        (["--scorer", "my_scorers_bad:not_numbers"], "want a number"),
        (["--scorer", "json:dumps", "--turns", "2"], "needs rows with a `turns` list"),
        (["--scorer", "json:dumps", "--max-prompt-len", "8"], "raise --max-prompt-len or pass"),
        (["--scorer", "json:dumps", "--temperature", "0", "--num-samples", "2"], "identical responses"),
    ],
)
def test_cli_errors(tiny_lm_dir, data, tmp_path, monkeypatch, extra, message):
    (tmp_path / "my_scorers_bad.py").write_text(
        "def wrong_length(prompts, responses):\n    return [1.0]\n"
        "def not_numbers(prompts, responses):\n    return ['high'] * len(responses)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["eval", "--policy", tiny_lm_dir, "--prompts", data["prompts"], "--output", str(tmp_path / "o")]
    result = runner.invoke(app, [*args, "--max-new-tokens", "4", "--max-prompt-len", "48", *extra])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize(
    "policy, message",
    [
        ("{tmp}/no_such_folder", "--policy {tmp}/no_such_folder: no such folder"),
        ("{lm}/config.json", "is a file, not a model folder"),
        ("{tmp}/empty_run", "holds no config.json"),
        ("{tmp}/lora_run", "lora_run/policy holds a LoRA adapter alone (--lora-export adapter)"),
        ("{tmp}/lora_run/policy", "lora_run/policy holds a LoRA adapter alone (--lora-export adapter)"),
    ],
)
def test_a_policy_that_is_not_a_model_is_one_line(tiny_lm_dir, data, tmp_path, policy, message):
    """Every --policy is checked before any model loads, as ppo train checks its --policy."""
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "lora_run" / "policy").mkdir(parents=True)  # ppo train --lora-export adapter
    (tmp_path / "lora_run" / "policy" / "adapter_config.json").write_text("{}")
    policy = policy.format(tmp=tmp_path, lm=tiny_lm_dir)
    args = ["eval", "--policy", tiny_lm_dir, "--policy", policy, "--prompts", data["prompts"]]
    args += ["--output", str(tmp_path / "o"), "--scorer", "json:dumps", "--max-new-tokens", "4"]
    result = runner.invoke(app, [*args, "--max-prompt-len", "48"])
    assert result.exit_code == 2, result.output
    assert message.format(tmp=tmp_path) in " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "o").exists()  # nothing generated for the first policy either


def test_a_scorer_given_as_a_file_path(tmp_path, monkeypatch):
    """`--scorer path/to/file.py:function` loads the file, whether or not its folder is importable."""
    from segppo.eval import load_callable

    scorer = "def score(prompts, responses):\n    return [1.0] * len(responses)\n"
    (tmp_path / "gold_scorer.py").write_text(scorer)
    monkeypatch.chdir(tmp_path)
    for spec in (f"{tmp_path}/gold_scorer.py:score", "./gold_scorer.py:score", "gold_scorer.py:score"):
        assert load_callable(spec)(["p"], ["r", "s"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"--scorer ./missing.py:score: no such file"):
        load_callable("./missing.py:score")
    with pytest.raises(ValueError, match="has no attribute 'other'"):
        load_callable("./gold_scorer.py:other")


def test_an_instruction_row_keeps_its_input():
    """Alpaca-format rows put the material an instruction works on in `input`; a prompt without it
    ("Translate the sentence into French.") asks for something else."""
    from segppo.eval import prompts_from_rows

    rows = [
        {"instruction": "Translate the sentence into French.", "input": "The cat sleeps.", "output": "x"},
        {"instruction": "Name a color.", "input": "", "output": "Red."},
        {"instruction": "Say a city.", "output": "Paris."},
    ]
    prompts, _ = prompts_from_rows(rows)
    assert [p.messages for p in prompts] == [
        [{"role": "user", "content": "Translate the sentence into French.\n\nThe cat sleeps."}],
        [{"role": "user", "content": "Name a color."}],
        [{"role": "user", "content": "Say a city."}],
    ]


def test_the_layout_recorded_is_the_one_read(data):
    """results.json's prompts.layout says how the rows were read: AlpacaEval rows are `instruction`."""
    from segppo.eval import load_eval_prompts

    layouts = {name: load_eval_prompts(data[name])[1].layout for name in ("alpaca", "arena", "prompts")}
    assert layouts == {"alpaca": "instruction", "arena": "turns", "prompts": "prompt"}


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--segmenter", "./no/such/segmenter", "no such folder"),
        ("--normalizer", "./no/such/normalizer.json", "no such file"),
    ],
)
def test_a_missing_rm_companion_is_one_line(tiny_lm_dir, rm_dir, data, tmp_path, option, value, message):
    """--segmenter and --normalizer are checked with --reward-model before any model loads, as in
    rm train and ppo train."""
    args = ["eval", "--policy", tiny_lm_dir, "--prompts", data["prompts"], "--output", str(tmp_path / "o")]
    args += ["--reward-model", rm_dir, option, value, "--max-new-tokens", "4", "--max-prompt-len", "48"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"{option} {value}: {message}" in " ".join(result.output.split())


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_the_vllm_engine_without_vllm_is_one_line(tiny_lm_dir, rm_dir, data, tmp_path):
    """Said before the scorer or any policy loads (eval, ppo train), not as an ImportError
    traceback afterwards."""
    args = ["eval", "--policy", tiny_lm_dir, "--prompts", data["prompts"], "--output", str(tmp_path / "o")]
    args += [
        "--scorer",
        "json:dumps",
        "--rollout-engine",
        "vllm",
        "--max-new-tokens",
        "4",
        "--max-prompt-len",
        "48",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--rollout-engine vllm needs vLLM: pip install 'segppo[vllm]'" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()
    args = ["ppo", "train", "--policy", tiny_lm_dir, "--reward-model", rm_dir, "--prompts", data["prompts"]]
    args += ["--output", str(tmp_path / "p"), "--rollout-engine", "vllm", "--max-new-tokens", "4"]
    result = runner.invoke(app, [*args, "--max-prompt-len", "48"])
    assert result.exit_code == 2, result.output
    assert "--rollout-engine vllm needs vLLM" in " ".join(result.output.split())


def test_a_scorer_that_fails_leaves_the_generations(tiny_lm_dir, data, tmp_path):
    """Generation is the slow part: a scorer that raises on them must not throw them away."""

    def broken(prompts, responses):
        raise RuntimeError("the judge is down")

    cfg = EvalConfig(policy=[tiny_lm_dir], name=["sft"], prompts=data["prompts"], output=str(tmp_path), **GEN)
    with pytest.raises(RuntimeError, match="the judge is down"):
        evaluate(cfg, scorer_fn=broken, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "responses" / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == len(PROMPTS) + 1 and all(r["score"] is None for r in rows)
    assert all(isinstance(r["response"], str) for r in rows)


def test_an_earlier_evals_folder_or_a_file_is_refused_before_any_work(tiny_lm_dir, data, tmp_path):
    """Nothing saved is lost: another eval into a finished eval's folder overwrote its results.json
    and left the first eval's other policies' answer files beside its own (Arena-Hard's tools read
    every file in model_answer/); an --output that is a file failed with '[Errno 17] File exists'
    after the scorer and prompts had loaded. Both are refused before anything loads; the same eval
    may run again."""
    import dataclasses

    out = tmp_path / "o"
    cfg = EvalConfig(policy=[tiny_lm_dir], name=["sft"], prompts=data["prompts"], output=str(out), **GEN)
    evaluate(cfg, scorer_fn=length_scorer, progress=False)
    first = (out / "results.json").read_text()
    with pytest.raises(FileExistsError, match=r"^--output .*o holds an earlier eval of sft \(1 turn"):
        evaluate(dataclasses.replace(cfg, name=["other"]), scorer_fn=length_scorer, progress=False)
    assert (out / "results.json").read_text() == first and not (out / "responses" / "other.jsonl").exists()
    evaluate(cfg, scorer_fn=length_scorer, progress=False)  # the same eval again replaces its own files
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"^--output .*a_file: a file, not a folder"):
        evaluate(dataclasses.replace(cfg, output=str(tmp_path / "a_file")), scorer_fn=length_scorer)


def test_chat_template_kwargs_render_the_policys_prompts(tiny_lm_dir, rm_dir, data, tmp_path):
    from tiny import CHATML_TEMPLATE

    from segppo.data import ChatFormat
    from segppo.eval.runner import chat_template_kwargs_for
    from segppo.eval.scoring import RewardModelScorer
    from segppo.rm.scoring import load_scorer

    no_thinking = {"enable_thinking": False}
    switch = (  # Qwen3's: given enable_thinking=false, the generation prompt closes an empty think block
        "{% if enable_thinking is defined and enable_thinking is false %}"
        "{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    )
    cfg = EvalConfig(
        policy=[tiny_lm_dir],
        prompts=data["prompts"],
        output=str(tmp_path),
        reward_model=rm_dir,
        chat_template=CHATML_TEMPLATE.replace("{% endif %}", switch + "{% endif %}"),
        chat_template_kwargs=no_thinking,
        **{**GEN, "max_prompt_len": 64},  # the empty think block's tokens too
    )
    results = evaluate(cfg, progress=False)
    (result,) = results.policies.values()
    assert results.to_dict()["policies"][result.name]["chat_template_kwargs"] == no_thinking  # recorded
    scorer = RewardModelScorer(load_scorer(rm_dir), normalize=False)
    tokenizer = scorer.scorer.tokenizer
    assert tokenizer.decode(result.generations[0].prompt_ids).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # Without the option: the RM's recorded kwargs (none here). The policy's ids are scored as they
    # are only when they were rendered with the RM's template and kwargs alike.
    assert chat_template_kwargs_for(cfg, tokenizer, scorer) == no_thinking
    assert (
        chat_template_kwargs_for(dataclasses.replace(cfg, chat_template_kwargs=None), tokenizer, scorer) == {}
    )
    assert scorer.reads_policy_ids(tokenizer, ChatFormat(tokenizer, scorer.chat.template))
    assert not scorer.reads_policy_ids(
        tokenizer, ChatFormat(tokenizer, scorer.chat.template, template_kwargs=no_thinking)
    )


def test_a_policy_is_prompted_with_the_template_variables_it_was_trained_with(tiny_lm_dir, data, tmp_path):
    # A PPO policy's segppo.json records the variables it was trained in (a Qwen3 policy trained with
    # enable_thinking false); eval with a scorer of its own prompted it without them (thinking mode).
    from tiny import CHATML_TEMPLATE

    from segppo.models.metadata import SegppoMetadata

    switch = (
        "{% if enable_thinking is defined and enable_thinking is false %}"
        "{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    )
    template = CHATML_TEMPLATE.replace("{% endif %}", switch + "{% endif %}")
    policy = tmp_path / "policy"
    shutil.copytree(tiny_lm_dir, policy)
    recorded = {"enable_thinking": False}
    SegppoMetadata(kind="policy", chat_template=template, chat_template_kwargs=recorded).save(
        policy / "segppo.json"
    )
    cfg = EvalConfig(
        policy=[str(policy)],
        prompts=data["prompts"],
        output=str(tmp_path / "eval"),
        chat_template=template,
        **{**GEN, "max_prompt_len": 64},
    )
    (result,) = evaluate(cfg, scorer_fn=length_scorer, progress=False).policies.values()
    assert result.chat_template_kwargs == recorded
    prompt = result.generations[0].prompt_ids
    from segppo.models.loading import load_tokenizer

    assert (
        load_tokenizer(str(policy)).decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    )
    # the option still wins
    cfg = dataclasses.replace(cfg, output=str(tmp_path / "eval2"), chat_template_kwargs={})
    (result,) = evaluate(cfg, scorer_fn=length_scorer, progress=False).policies.values()
    assert result.chat_template_kwargs is None
