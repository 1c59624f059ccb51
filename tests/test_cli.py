"""The `segppo` command line: config files, presets, flags and error messages."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import typer
from segppo.cli.main import app
from typer.testing import CliRunner

from segppo.config import (
    FIT_NORMALIZER_PRESETS,
    PPO_PRESETS,
    RM_PRESETS,
    DemoConfig,
    EvalConfig,
    FitNormalizerConfig,
    PPOConfig,
    RMConfig,
    RMEvalConfig,
)
from segppo.tracking import read_metrics

runner = CliRunner()

SMALL = [
    "--lr",
    "3e-3",
    "--batch-size",
    "16",
    "--micro-batch-size",
    "8",
    "--max-len",
    "64",
    "--max-prompt-len",
    "32",
    "--zero-stage",
    "0",
    "--eval-fraction",
    "0.2",
]


def plain(result) -> str:
    """The output with rich's panel borders and line wrapping taken out."""
    return " ".join(result.output.replace("│", " ").split())


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "rm" in result.stdout and "info" in result.stdout
    assert invoke("rm", "--help").exit_code == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernel path of CPU tensors")
def test_info_says_what_the_ops_do_with_the_kernel_setting(monkeypatch):
    """`segppo info` reports the path the ops take: a forced Triton path that the ops refuse on CPU
    tensors, and a SEGPPO_KERNELS value they reject, are shown as such, not as a working path."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for value, kernels in [
        ("", "torch on cpu"),
        ("torch", "torch on cpu"),
        ("triton", "none: SEGPPO_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1"),
        ("bogus", "none: SEGPPO_KERNELS must be one of ('torch', 'triton'), got 'bogus'"),
    ]:
        monkeypatch.setenv("SEGPPO_KERNELS", value)
        result = invoke("info")
        assert result.exit_code == 0, result.output
        assert f"kernels {kernels}" in plain(result), plain(result)


@pytest.mark.smoke
def test_rm_train_eval_inspect_end_to_end(tiny_lm_dir, preferences_file, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "rm.yaml"
    # keys are option names; the explicit --max-steps flag wins over the file's value
    config.write_text(
        f"model: {tiny_lm_dir}\ndataset: {preferences_file}\nmax-steps: 9\ngranularity: token\n"
    )
    result = invoke("rm", "train", "--config", str(config), "--output", str(out), "--max-steps", "4", *SMALL)
    assert result.exit_code == 0, result.output
    assert len(read_metrics(out, split="train")) == 4
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["granularity"] == "token" and run_config["max_steps"] == 4

    result = invoke(
        "rm", "eval", "--model", str(out), "--dataset", preferences_file, "--max-len", "64", "--json"
    )
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["num_pairs"] == 80 and 0 <= stats["accuracy"] <= 1
    # the table, in a non-terminal stream 80 columns wide: every value whole
    args = ["rm", "eval", "--model", str(out), "--dataset", preferences_file, "--max-len", "64"]
    result = runner.invoke(app, args, env={"COLUMNS": "80"}, catch_exceptions=False)
    assert result.exit_code == 0 and "…" not in result.output, result.output
    for key, value in stats.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        assert key in result.output and shown in result.output, key

    result = invoke(
        "rm", "inspect", "--model", str(out), "--prompt", "Name the capital.", "--response", "Paris"
    )
    assert result.exit_code == 0, result.output
    assert "token segments" in result.stdout and "Paris"[:2] in result.stdout


def test_preset_sets_the_papers_values():
    preset = RM_PRESETS["llama3.1-instruct-8b-segment"]
    assert preset["model"] == "meta-llama/Llama-3.1-8B-Instruct" and preset["entropy_threshold"] == 2.0
    assert RM_PRESETS["phi3-mini-segment"]["entropy_threshold"] == 1.75
    assert all(p["batch_size"] == 128 and p["lr"] == 1e-6 for p in RM_PRESETS.values())
    assert len(RM_PRESETS) == 9


def test_config_file_loads_into_defaults_and_flags_win(tmp_path, monkeypatch):
    import segppo.rm.trainer as trainer

    seen = {}
    monkeypatch.setattr(trainer, "train_reward_model", lambda cfg: seen.setdefault("cfg", cfg))
    config = tmp_path / "c.yaml"
    config.write_text("lr: 5.0e-6\nmicro_batch_size: 4\nbatch-size: 64\n")
    result = invoke(
        "rm",
        "train",
        "--preset",
        "phi3-mini-segment",
        "--config",
        str(config),
        "--output",
        "o",
        "--lr",
        "1e-5",
    )
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert cfg.model == "microsoft/Phi-3-mini-4k-instruct"  # from the preset
    assert cfg.entropy_threshold == 1.75 and cfg.zero_stage == 3  # preset
    assert cfg.micro_batch_size == 4 and cfg.batch_size == 64  # the file beats the preset
    assert cfg.lr == 1e-5  # the flag beats the file


def test_a_config_file_may_give_a_repeatable_option_one_value(tmp_path, monkeypatch):
    """`stop_token: "###"` (one value of a repeatable option, as on the command line) failed as
    "Invalid value for '--stop-token': Value must be an iterable"; it is a list of one."""
    import segppo.ppo.trainer as trainer

    seen = {}
    monkeypatch.setattr(trainer, "train_ppo", lambda cfg: seen.setdefault("cfg", cfg))
    config = tmp_path / "c.yaml"
    required = "policy: p\nreward_model: r\nprompts: x.jsonl\noutput: o\n"
    config.write_text(required + 'stop_token: "###"\n')
    result = invoke("ppo", "train", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert seen["cfg"].stop_token == ["###"]
    config.write_text(required + "stop_token: ['###', '<|x|>']\n")
    seen.clear()
    assert invoke("ppo", "train", "--config", str(config)).exit_code == 0
    assert seen["cfg"].stop_token == ["###", "<|x|>"]


def test_a_config_file_reads_numbers_with_a_leading_zero_as_written(tmp_path, monkeypatch):
    """YAML 1.1 (PyYAML) reads `seed: 042` as the octal 34 and `max_steps: 1:30` as the base-60 90,
    which silently ran another seed or step count than the one written; a str option got "34"."""
    import segppo.rm.trainer as trainer

    seen = {}
    monkeypatch.setattr(trainer, "train_reward_model", lambda cfg: seen.setdefault("cfg", cfg))
    config = tmp_path / "c.yaml"
    config.write_text("seed: 042\nmax_steps: 0010\nprompt_key: 042\nlr: 1e-5\nbatch_size: 0x20\n")
    result = invoke("rm", "train", "--model", "m", "--dataset", "d", "--output", "o", "--config", str(config))
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.seed, cfg.max_steps, cfg.prompt_key) == (42, 10, "042")
    assert cfg.lr == 1e-5 and cfg.batch_size == 32  # YAML 1.1's string 1e-5 is a float; hex stays hex
    config.write_text("max_steps: 1:30\n")
    result = runner.invoke(
        app, ["rm", "train", "--model", "m", "--dataset", "d", "--output", "o", "--config", str(config)]
    )
    assert result.exit_code == 2 and "--max-steps" in plain(result), result.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "lora_targets: [q_proj, v_proj]\n",
            "option 'lora_targets' takes one value, got ['q_proj', 'v_proj']",
        ),
        ("dataset: {path: d}\n", "option 'dataset' takes one value, got {'path': 'd'}"),
    ],
)
def test_a_list_or_mapping_for_a_one_value_option_is_a_usage_error(tmp_path, monkeypatch, content, message):
    """A list or mapping given to a one-value option became its Python text, found wrong only after
    the model loaded: lora_targets "['q_proj', 'v_proj']" (split at the comma, no module matched), a
    --dataset path "{'path': 'd'}"."""
    import segppo.rm.trainer as trainer

    seen = {}
    monkeypatch.setattr(trainer, "train_reward_model", lambda cfg: seen.setdefault("cfg", cfg))
    config = tmp_path / "c.yaml"
    config.write_text("model: m\ndataset: d\n" + content)
    result = runner.invoke(app, ["rm", "train", "--config", str(config), "--output", "o"])
    assert result.exit_code == 2 and message in plain(result), result.output
    assert not seen


@pytest.mark.parametrize(
    ("content", "message"),
    [("lr: [1, 2\n", "not valid YAML"), ("learning_rate: 1\n", "unknown option"), ("- a\n", "mapping")],
)
def test_bad_config_files_are_usage_errors(tmp_path, content, message):
    config = tmp_path / "c.yaml"
    config.write_text(content)
    result = runner.invoke(app, ["rm", "train", "--config", str(config), "--output", "o"])
    assert result.exit_code == 2
    assert message in plain(result)


def test_missing_config_file_and_unknown_preset():
    result = runner.invoke(app, ["rm", "train", "--config", "/no/such.yaml"])
    assert result.exit_code == 2 and "does not exist" in plain(result)
    result = runner.invoke(app, ["rm", "train", "--preset", "gpt5", "--output", "o"])
    assert result.exit_code == 2 and "unknown preset" in plain(result)


def test_bad_values_name_the_option(tiny_lm_dir, preferences_file, tmp_path):
    result = runner.invoke(
        app,
        [
            "rm",
            "train",
            "--model",
            tiny_lm_dir,
            "--dataset",
            preferences_file,
            "--output",
            str(tmp_path / "o"),
            "--granularity",
            "sentence",
        ],
    )
    assert result.exit_code == 2 and "--granularity" in plain(result)
    result = runner.invoke(
        app,
        [
            "rm",
            "train",
            "--model",
            tiny_lm_dir,
            "--dataset",
            "/no/data.jsonl",
            "--output",
            str(tmp_path / "o2"),
            *SMALL,
        ],
    )
    assert result.exit_code == 2 and "/no/data.jsonl" in plain(result)
    assert not (tmp_path / "o2" / "model").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["rm", "train", "--model", "/no/model", "--dataset", "/no/d.jsonl"],
        ["ppo", "train", "--policy", "/no/p", "--reward-model", "/no/r", "--prompts", "/no/p.jsonl"],
    ],
)
def test_a_zero_stage_outside_0_to_3_is_refused_before_anything_loads(command, tmp_path):
    result = runner.invoke(app, [*command, "--output", str(tmp_path / "o"), "--zero-stage", "4"])
    assert result.exit_code == 2, plain(result)
    assert "--zero-stage must be 0, 1, 2 or 3, got 4" in plain(result)


# --------------------------------------------------------------------------------------------
# One source of options: every config field is one option of its command, with the same default

COMMANDS = {
    ("rm", "train"): RMConfig,
    ("rm", "eval"): RMEvalConfig,
    ("ppo", "train"): PPOConfig,
    ("fit-normalizer",): FitNormalizerConfig,
    ("eval",): EvalConfig,
    ("demo",): DemoConfig,
}
# Options of a command that are not config fields.
CLI_ONLY = {"config", "preset", "as_json", "list_keys", "help"}


def click_command(path):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_config_field_is_one_option_with_the_fields_default(path):
    config_cls = COMMANDS[path]
    params = [p for p in click_command(path).params if p.name not in CLI_ONLY]
    names = [p.name for p in params]
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    assert sorted(names) == sorted(fields), "options and config fields differ"
    for param in params:
        field = fields[param.name]
        assert param.opts[0] == "--" + field.name.replace("_", "-")
        if field.default is dataclasses.MISSING:
            assert param.required, field.name
        else:
            assert not param.required and param.default == field.default, field.name
        assert param.multiple == ("list" in str(field.type)), field.name


def test_a_new_config_field_gets_an_option():
    """What another engineer's plain `strict: bool = False` in a config gets: a --strict flag."""
    from segppo.cli.options import config_options

    @dataclasses.dataclass
    class Config:
        model: str
        strict: bool = False
        limit: int | None = None

    seen = {}

    @config_options(Config)
    def command(values):
        seen.update(values)

    small = typer.Typer()
    small.command()(command)
    result = runner.invoke(small, ["--model", "m", "--strict", "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert seen == {"model": "m", "strict": True, "limit": 3}


def test_prompt_limit_follows_max_len(monkeypatch):
    import segppo.rm.trainer as trainer

    seen = {}
    monkeypatch.setattr(trainer, "train_reward_model", lambda cfg: seen.setdefault("cfg", cfg))
    result = invoke("rm", "train", "--model", "m", "--dataset", "d", "--output", "o", "--max-len", "128")
    assert result.exit_code == 0, result.output
    assert seen["cfg"].max_prompt_len == 108  # 27/32 of --max-len
    assert RMConfig(model="m", dataset="d", output="o").max_prompt_len == 1728  # the paper's
    for config_cls in (RMEvalConfig, FitNormalizerConfig):
        values = (
            dict(model="m", dataset="d")
            if config_cls is RMEvalConfig
            else dict(reward_model="m", dataset="d")
        )
        assert config_cls(**values, max_len=64).max_prompt_len == 54
    # an explicit contradiction stays an error
    result = runner.invoke(
        app,
        [
            "rm",
            "train",
            "--model",
            "m",
            "--dataset",
            "d",
            "--output",
            "o",
            "--max-len",
            "128",
            "--max-prompt-len",
            "200",
        ],
    )
    assert result.exit_code == 2 and "--max-prompt-len (200) must be below --max-len (128)" in plain(result)
    with pytest.raises(ValueError, match="must be below"):
        RMEvalConfig(model="m", dataset="d", max_len=64, max_prompt_len=64)


def test_fit_normalizer_presets_use_the_papers_fit():
    assert FIT_NORMALIZER_PRESETS and all(p["fit_mode"] == "paper" for p in FIT_NORMALIZER_PRESETS.values())
    assert FitNormalizerConfig(reward_model="m", dataset="d").fit_mode == "weighted"  # segppo's default
    preset = FIT_NORMALIZER_PRESETS["llama3.1-instruct-8b-segment"]
    assert preset["reward_model"] == PPO_PRESETS["llama3.1-instruct-8b-segment"]["reward_model"]
    assert FitNormalizerConfig(**preset).samples == 60000


def test_compare_takes_commas_or_repeats():
    assert DemoConfig(compare=["bandit,token", "segment"]).compare == ["bandit", "token", "segment"]
    assert DemoConfig(compare="bandit, segment").compare == ["bandit", "segment"]


def _every_command_config() -> list[tuple[type, dict]]:
    """Each command's config class with the least values it is built from."""
    from segppo.config import FitNormalizerConfig, PPOConfig, RMConfig, RMEvalConfig
    from segppo.config_data import DataInspectConfig
    from segppo.config_eval import DemoConfig, EvalConfig

    return [
        (RMConfig, dict(model="m", dataset="d", output="o")),
        (RMEvalConfig, dict(model="r", dataset="d")),
        (PPOConfig, dict(policy="p", reward_model="r", prompts="q", output="o")),
        (FitNormalizerConfig, dict(reward_model="r", dataset="d")),
        (EvalConfig, dict(policy=["p"], prompts="q", output="o", scorer="json:dumps")),
        (DataInspectConfig, dict(dataset="d")),
        (DemoConfig, dict()),
    ]


def test_nan_is_refused_by_every_float_option_of_every_command():
    """NaN passes every comparison (`nan <= 0` is false): `rm train --lr nan` (or `lr: .nan` in a
    config) loaded the data and model and trained to NaN weights; `--kl-coef nan`, `--actor-lr nan`,
    ... likewise. Each command's options refuse it at once, naming the option."""
    import typing

    accepted, refused = [], {}
    for cls, values in _every_command_config():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "float" not in str(hints[f.name]):
                continue
            try:
                cls(**values, **{f.name: float("nan")})
            except ValueError as err:
                refused[f"{cls.__name__}.{f.name}"] = (str(err), f"--{f.name.replace('_', '-')}")
            else:
                accepted.append(f"{cls.__name__}.{f.name}")
    assert not accepted
    assert {"RMConfig.lr", "PPOConfig.kl_coef", "PPOConfig.critic_lr", "EvalConfig.threshold"} <= set(refused)
    for message, flag in refused.values():
        assert message == f"{flag} must be a number, got nan"


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_numpy_cannot_take_is_refused_by_every_command(seed):
    """Every seed reaches numpy, whose seeds are 0 .. 2**32 - 1: `rm train --seed -1` loaded the
    data and models, then failed with numpy's "Seed must be between 0 and 2**32 - 1", naming no
    option; now each command's options refuse it at once."""
    seeded = [(cls, values) for cls, values in _every_command_config() if "seed" in cls.__dataclass_fields__]
    assert len(seeded) == 6  # all but rm eval
    for cls, values in seeded:
        with pytest.raises(ValueError, match=rf"^--seed must be in \[0, 2\*\*32 - 1\], got {seed}$"):
            cls(**values, seed=seed)


def test_max_samples_is_checked_alike_by_every_command_that_takes_it():
    sampled = [(c, v) for c, v in _every_command_config() if "max_samples" in c.__dataclass_fields__]
    assert len(sampled) == 5  # rm train and eval, ppo train, eval, data inspect
    for cls, values in sampled:
        assert cls(**values, max_samples=None).max_samples is None  # every row
        with pytest.raises(ValueError, match=r"^--max-samples must be a positive integer, got 0$"):
            cls(**values, max_samples=0)


TEMPLATED = [
    (RMConfig, dict(model="m", dataset="d", output="o")),
    (PPOConfig, dict(policy="p", reward_model="r", prompts="q", output="o")),
    (EvalConfig, dict(policy=["p"], prompts="q", output="o", scorer="json:dumps")),
]


def test_chat_template_kwargs_are_a_json_object_for_every_command_with_a_chat_template():
    from segppo.config_data import DataInspectConfig

    for cls, values in [*TEMPLATED, (DataInspectConfig, dict(dataset="d"))]:
        assert "chat_template_kwargs" in {f.name for f in dataclasses.fields(cls)}, cls.__name__
        assert cls(**values).chat_template_kwargs is None
        given = cls(**values, chat_template_kwargs='{"enable_thinking": false}')
        assert given.chat_template_kwargs == {"enable_thinking": False}
        assert cls(**values, chat_template_kwargs={"enable_thinking": False}).chat_template_kwargs == {
            "enable_thinking": False
        }
        with pytest.raises(ValueError, match=r"^--chat-template-kwargs is not valid JSON \(Expecting"):
            cls(**values, chat_template_kwargs="{enable_thinking: false}")
        with pytest.raises(
            ValueError, match=r"^--chat-template-kwargs must be a JSON object .*, got \['enable_thinking'\]$"
        ):
            cls(**values, chat_template_kwargs='["enable_thinking"]')


def test_chat_template_kwargs_on_the_command_line_and_in_a_config_file(tmp_path, monkeypatch):
    import segppo.rm.trainer as trainer

    seen = {}
    monkeypatch.setattr(trainer, "train_reward_model", lambda cfg: seen.setdefault("cfg", cfg))
    given = ["rm", "train", "--model", "m", "--dataset", "d", "--output", "o"]
    result = invoke(*given, "--chat-template-kwargs", '{"enable_thinking": false}')
    assert result.exit_code == 0, result.output
    assert seen.pop("cfg").chat_template_kwargs == {"enable_thinking": False}
    # A YAML config gives a mapping.
    config = tmp_path / "c.yaml"
    config.write_text("chat_template_kwargs:\n  enable_thinking: false\n")
    result = invoke(*given, "--config", str(config))
    assert result.exit_code == 0, result.output
    assert seen.pop("cfg").chat_template_kwargs == {"enable_thinking": False}
    # A date, as Llama 3.1's template takes one, is the text written: YAML made it a datetime.date,
    # which passed the checks and stopped the run after loading the model, in a traceback (TypeError:
    # Object of type date is not JSON serializable) where run_config.json is written.
    config.write_text("chat_template_kwargs:\n  date_string: 2024-06-01\n")
    result = invoke(*given, "--config", str(config))
    assert result.exit_code == 0, result.output
    kwargs = seen.pop("cfg").chat_template_kwargs
    assert kwargs == {"date_string": "2024-06-01"} and json.loads(json.dumps(kwargs)) == kwargs
    # Malformed JSON is a usage error naming the option, on one line.
    result = runner.invoke(app, [*given, "--chat-template-kwargs", "enable_thinking=false"])
    assert result.exit_code == 2 and "--chat-template-kwargs is not valid JSON" in plain(result)
    assert not seen
