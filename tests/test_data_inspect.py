"""`segppo data inspect`: a dataset as the training commands read it (same rows, same ids)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from segppo.cli.main import app
from typer.testing import CliRunner

from segppo.config import DataInspectConfig, RMConfig
from segppo.data import ChatFormat, load_rows, to_prompt_examples
from segppo.data.inspection import inspect_data
from segppo.models.loading import load_tokenizer
from segppo.rm.trainer import prepare_preferences

runner = CliRunner()

DATA = Path(__file__).resolve().parent / "data" / "preferences_with_bad_rows.jsonl"
SPLIT = dict(eval_fraction=0.25, seed=3, max_len=64)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_the_rows_and_the_example_are_rm_trains(tiny_lm_dir):
    """Kept and skipped rows per part, and the shown ids, are exactly what rm train prepares."""
    tokenizer = load_tokenizer(tiny_lm_dir)
    report = inspect_data(DataInspectConfig(dataset=str(DATA), **SPLIT), tokenizer)
    rm = prepare_preferences(
        RMConfig(model=tiny_lm_dir, dataset=str(DATA), output="unused", **SPLIT), tokenizer
    )
    assert report.kind == "preference" and report.layout == "prompt_response"
    assert report.splits == {"train": 8}
    train, evaluation = report.parts
    assert (train.rows, evaluation.rows) == (6, 2)
    for part, expected in ((train, rm.train_report), (evaluation, rm.eval_report)):
        assert (part.report.kept, part.report.skipped, part.report.reasons) == (
            expected.kept,
            expected.skipped,
            expected.reasons,
        )
    assert train.report.skipped >= 1  # the file holds an empty prompt and a row without 'rejected'
    first = rm.train[0]  # the first pair rm train trains on, as ids
    shown = report.example
    assert shown.prompt.text == tokenizer.decode(first.prompt_ids, skip_special_tokens=False)
    assert shown.prompt.tokens == len(first.prompt_ids)
    chosen, rejected = shown.responses
    assert chosen.text == tokenizer.decode(first.chosen_ids, skip_special_tokens=False)
    assert rejected.tokens == len(first.rejected_ids)
    assert chosen.stop == "<|im_end|>" and report.stop_tokens == ["<|im_end|>"]


def test_lengths_are_untruncated_and_counted_against_the_limits(tiny_lm_dir):
    tokenizer = load_tokenizer(tiny_lm_dir)
    cfg = DataInspectConfig(dataset=str(DATA), eval_fraction=0.25, seed=3, max_len=48)
    report = inspect_data(cfg, tokenizer)
    chat = ChatFormat(tokenizer)
    kept = report.parts[0].examples
    prompts = [len(chat.prompt_ids(e.prompt)) for e in kept]
    by_name = {lengths.name: lengths for lengths in report.lengths}
    assert by_name["prompt"].values == prompts and max(prompts) > cfg.max_prompt_len  # the long row
    assert by_name["prompt"].over == sum(n > cfg.max_prompt_len for n in prompts) >= 1
    assert by_name["prompt + response"].limit == 48 and by_name["prompt + response"].over >= 1
    assert report.measured_rows == len(kept)


def test_a_long_data_path_folds_instead_of_being_cut(tiny_lm_dir, tmp_path):
    # The data path is one unbreakable word: at 80 columns it was cut to "…/bad_rows.j…", so the
    # report hid which file it read (and test_cli_output_at_80_columns failed in a clone whose path
    # was long enough).
    folder = tmp_path / ("a-long-folder-name-" * 4) / "data"
    folder.mkdir(parents=True)
    data = folder / DATA.name
    data.write_text(DATA.read_text())
    args = ["data", "inspect", str(data), "--model", tiny_lm_dir, "--max-len", "64"]
    result = runner.invoke(app, args, env={"COLUMNS": "80"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and max(len(line) for line in result.output.splitlines()) <= 80
    assert str(data) in "".join(line.strip() for line in result.output.splitlines())


def test_cli_output_at_80_columns(tiny_lm_dir):
    args = ["data", "inspect", str(DATA), "--model", tiny_lm_dir, "--max-len", "64"]
    args += ["--eval-fraction", "0.25", "--seed", "3"]
    result = runner.invoke(app, args, env={"COLUMNS": "80"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    text = flat(out)
    assert "splits train 8 rows" in text and "layout prompt_response" in text
    assert "row 2: prompt is empty" in text
    assert "held out of split 'train' (--eval-fraction 0.25, --seed 3): 2 rows" in text
    # the example: the chat template's tokens, the cut point and the stop, newlines made visible
    assert "<|im_start|>user↵\n" in out and "<|im_start|>assistant↵\n" in out
    assert "── the response starts here, after token" in out and "ends with the stop <|im_end|>" in out
    assert "limits: --max-prompt-len 54, --max-len 64" in out


def test_without_a_tokenizer_the_layout_and_messages(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["data", "inspect", str(path)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "read as prompts, layout prompt (as ppo train, eval read it)" in text
    assert "kept 1, skipped 0" in text and "system: Be brief. user: Hi?" in text


def test_prompt_data_is_read_as_ppo_reads_it(tiny_lm_dir, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Name the capital."}\n{"prompt": 3}\n{"prompt": "Name a prime number."}\n')
    tokenizer = load_tokenizer(tiny_lm_dir)
    report = inspect_data(DataInspectConfig(dataset=str(path), max_prompt_len=16), tokenizer)
    examples, expected = to_prompt_examples(load_rows(str(path)))  # what ppo train's load_prompts converts
    (part,) = report.parts
    assert report.kind == "prompt" and part.report.reasons == expected.reasons and part.report.kept == 2
    assert report.example.responses == [] and report.example.prompt.truncated  # 16 tokens: cut
    assert report.lengths[0].over == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--row", "2"], "--row 2 is skipped (row 2: prompt is empty)"),
        (["--row", "99"], "--row 99 is not among the train rows"),
    ],
)
def test_a_bad_row_is_one_clear_line(tiny_lm_dir, extra, message):
    args = ["data", "inspect", str(DATA), "--model", tiny_lm_dir, "--eval-fraction", "0.25", "--seed", "3"]
    result = runner.invoke(app, args + extra)
    assert result.exit_code == 2 and message in flat(result.output), result.output


def test_rows_are_numbered_as_in_the_file_when_rows_are_held_out(tiny_lm_dir):
    # --seed 42 holds out rows 3 and 4: the row without 'rejected' is the file's row 5, whichever
    # rows are held out, in the skip reasons (rm train's too) and in --row.
    tokenizer = load_tokenizer(tiny_lm_dir)
    cfg = dict(dataset=str(DATA), eval_fraction=0.25, seed=42, max_len=64)
    train, _ = inspect_data(DataInspectConfig(**cfg), tokenizer).parts
    assert train.report.reasons == ["row 2: prompt is empty", "row 5: missing 'rejected'"]
    assert [e.row for e in train.examples] == [0, 1, 6, 7]
    shown = inspect_data(DataInspectConfig(**cfg, row=7), tokenizer).example
    assert shown.row == 7 and "I think it is Lyon." in shown.response_texts["rejected"]
    with pytest.raises(
        ValueError, match=r"--row 3 is not among the train rows \(split 'train' less the held-out"
    ):
        inspect_data(DataInspectConfig(**cfg, row=3), tokenizer)
    rm = prepare_preferences(RMConfig(model=tiny_lm_dir, output="unused", **cfg), tokenizer)
    assert rm.train_report.reasons == train.report.reasons


def test_system_prompts_a_template_rejects_are_shown_folded(tiny_lm_dir, tmp_path):
    from tiny import CHATML_TEMPLATE

    rejecting = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}" + CHATML_TEMPLATE
    )
    path = tmp_path / "prompts.jsonl"
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]}
    path.write_text(json.dumps(row) + "\n")
    cfg = DataInspectConfig(dataset=str(path), chat_template=rejecting)
    report = inspect_data(cfg, load_tokenizer(tiny_lm_dir))
    assert report.system_notes == [
        "1 system prompts folded into the first user turn (the template has no system role)"
    ]
    assert "<|im_start|>user\nBe brief.\n\nHi?<|im_end|>" in report.example.prompt.text


def test_chat_template_kwargs_render_the_example_as_rm_train_does(tiny_lm_dir):
    from tiny import CHATML_TEMPLATE

    # Qwen3's switch: given enable_thinking=false, the generation prompt closes an empty think block.
    switch = (
        "{% if enable_thinking is defined and enable_thinking is false %}"
        "{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    )
    template = CHATML_TEMPLATE.replace("{% endif %}", switch + "{% endif %}")
    args = ["data", "inspect", str(DATA), "--model", tiny_lm_dir, "--eval-fraction", "0.25", "--seed", "3"]
    args += ["--chat-template", template]
    closed = "<|im_start|>assistant↵\n<think>↵\n↵\n</think>↵\n↵\n"
    result = runner.invoke(app, args, env={"COLUMNS": "80"}, catch_exceptions=False)
    assert result.exit_code == 0 and closed not in result.output, result.output
    result = runner.invoke(
        app, [*args, "--chat-template-kwargs", '{"enable_thinking": false}'], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0 and closed in result.output, result.output
    tokenizer = load_tokenizer(tiny_lm_dir)
    given = dict(chat_template=template, chat_template_kwargs={"enable_thinking": False}, **SPLIT)
    shown = inspect_data(DataInspectConfig(dataset=str(DATA), **given), tokenizer).example
    first = prepare_preferences(
        RMConfig(model=tiny_lm_dir, dataset=str(DATA), output="unused", **given), tokenizer
    )
    assert shown.prompt.text == tokenizer.decode(first.train[0].prompt_ids, skip_special_tokens=False)
    assert shown.prompt.text.endswith("<think>\n\n</think>\n\n")


def test_a_training_commands_config_file_shows_the_data_that_run_reads(tiny_lm_dir, tmp_path):
    # `data inspect --config rm.yaml` refused the run's training keys ("unknown option 'lr'"), and
    # ppo train names its data and tokenizer --prompts and --policy.
    rm_yaml = tmp_path / "rm.yaml"
    rm_yaml.write_text(
        f"model: {tiny_lm_dir}\ndataset: {DATA}\noutput: {tmp_path / 'rm'}\nlr: 1.0e-5\nbatch_size: 8\n"
        "eval_fraction: 0.25\nseed: 3\nmax_len: 64\nzero_stage: 2\n"
    )
    result = runner.invoke(app, ["data", "inspect", "--config", str(rm_yaml)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"data {DATA}" in flat(result.output) and "preference pairs" in result.output
    # the run's held-out rows, and its tokenizer's view against its --max-len
    assert "held out of split 'train' (--eval-fraction 0.25, --seed 3): 2 rows" in flat(result.output)
    assert "Name the capital.<|im_end|>" in result.output and "0 > 64" in flat(result.output)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name the capital of France, please."}\n')
    ppo_yaml = tmp_path / "ppo.yaml"
    ppo_yaml.write_text(
        f"policy: {tiny_lm_dir}\nreward_model: {tmp_path / 'rm'}\nprompts: {prompts}\n"
        f"output: {tmp_path / 'ppo'}\nactor_lr: 1.0e-6\nmax_prompt_len: 18\nlong_prompts: truncate\n"
    )
    result = runner.invoke(app, ["data", "inspect", "--config", str(ppo_yaml)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"data {prompts}" in flat(result.output) and "read as prompts" in flat(result.output)
    assert "1 > 18" in flat(result.output) and "limits: --max-prompt-len 18" in flat(result.output)
    # A key no command knows is still a typo.
    rm_yaml.write_text(f"datset: {DATA}\n")
    result = runner.invoke(app, ["data", "inspect", "--config", str(rm_yaml)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "unknown option 'datset'" in flat(result.output)


def test_a_ppo_config_file_without_a_prompt_limit_shows_ppo_trains_own(tiny_lm_dir, tmp_path):
    # ppo.yaml without max_prompt_len: ppo train holds prompts to its default 1024 tokens, but
    # `data inspect --config ppo.yaml` measured them against its own default, 27/32 of --max-len (1728).
    from segppo.config import PPOConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name the capital of France, please."}\n')
    ppo_yaml = tmp_path / "ppo.yaml"
    ppo_yaml.write_text(f"policy: {tiny_lm_dir}\nreward_model: rm\nprompts: {prompts}\noutput: ppo\n")
    result = runner.invoke(app, ["data", "inspect", "--config", str(ppo_yaml)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    ppo_limit = PPOConfig(policy="p", reward_model="r", prompts="q", output="o").max_prompt_len
    assert f"limits: --max-prompt-len {ppo_limit}" in flat(result.output)
    # an explicit flag still wins
    result = runner.invoke(
        app, ["data", "inspect", "--config", str(ppo_yaml), "--max-prompt-len", "20"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0 and "limits: --max-prompt-len 20" in flat(result.output), result.output


def test_a_ppo_config_file_with_a_long_prompt_limit_is_read(tiny_lm_dir, tmp_path):
    # ppo train takes any --max-prompt-len (its context is prompt + --max-new-tokens); data inspect
    # refused a ppo.yaml with max_prompt_len 3000 as not below its own --max-len default (2048).
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name the capital of France, please."}\n')
    ppo_yaml = tmp_path / "ppo.yaml"
    ppo_yaml.write_text(
        f"policy: {tiny_lm_dir}\nreward_model: rm\nprompts: {prompts}\noutput: ppo\nmax_prompt_len: 3000\n"
    )
    result = runner.invoke(app, ["data", "inspect", "--config", str(ppo_yaml)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "limits: --max-prompt-len 3000" in flat(result.output)
