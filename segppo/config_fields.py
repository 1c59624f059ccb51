"""The machinery of the configs (`segppo.config`): `option` fields, shared checks and YAML `--config`
files; `segppo.config` re-exports every name here."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

# The panels of `--help`, in the order they are shown (after a panel of the required options).
# Every config field names its panel with `option(..., panel=...)`: the one place it is declared.
DATA = "Data"
MODEL = "Model"
SEGMENTS = "Segments and rewards"
GENERATION = "Generation"
PPO = "PPO"
EVALUATION = "Evaluation"
NORMALIZER_FIT = "Normalizer fit"
DEMO = "Demo"
OPTIMISATION = "Optimisation"
MEMORY = "Memory and scale"
RUN = "Run and logging"
PANELS = (DATA, MODEL, SEGMENTS, GENERATION, PPO, EVALUATION, NORMALIZER_FIT, DEMO, OPTIMISATION, MEMORY, RUN)


def option(
    default: Any = dataclasses.MISSING,
    *,
    panel: str | None = None,
    help: str | None = None,
    argument: str | None = None,
) -> Any:
    """A config field as a CLI option: its `--help` panel (one of `PANELS`) and help text; with
    `argument` (its name in the usage line, e.g. "PATH_OR_NAME") it is given by position, not `--name`.

    Every field of a command's config names its panel (tests/test_cli_help.py fails on one without);
    until it does, `--help` lists it under "Other options".
    """
    if panel is not None and panel not in PANELS:
        raise ValueError(f"unknown help panel {panel!r}; one of {PANELS}")
    return dataclasses.field(default=default, metadata={"help": help, "panel": panel, "argument": argument})


# `--chat-template-kwargs` of every command that takes `--chat-template`; each adds its default.
CHAT_TEMPLATE_KWARGS_HELP = (
    "Chat template variables, a JSON object; '{\"enable_thinking\": false}' "
    "makes Qwen3 answer without reasoning"
)

# The paper's prompt budget: 1728 of 2048 tokens, the rest for the response.
PROMPT_SHARE = 1728 / 2048


def resolve_prompt_limit(config: Any) -> None:
    """Set `max_prompt_len` from `max_len` when it is not given; it must leave room for a response."""
    if config.max_prompt_len is None:
        config.max_prompt_len = max(1, int(config.max_len * PROMPT_SHARE))
    if config.max_prompt_len >= config.max_len:
        raise ValueError(
            f"--max-prompt-len ({config.max_prompt_len}) must be below --max-len ({config.max_len}) "
            "to leave room for the response"
        )


def check_normalizer_options(config: Any) -> None:
    """The normalizer options PPO and eval share (`resolve_normalizer`): σ(p) = max(std, σ_floor),
    so a std that is not positive would silently become the floor (every reward ×100 at 1e-2)."""
    for name in ("sigma_floor", "reward_std"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_schedule_options(config: Any) -> None:
    """The optimisation and saving options RM training and PPO share. The cosine ends at
    `min_lr_ratio` × the peak (below 0 the last steps would run at a negative learning rate);
    `save_every` N saves when the step is a multiple of N (`step % -1 == 0`: every step)."""
    for name in ("warmup_ratio", "min_lr_ratio"):
        if not 0 <= getattr(config, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(config, name)}")
    for name in ("weight_decay", "save_every"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")


def check_not_nan(config: Any) -> None:
    """A float option given NaN (`--lr nan`, `lr: .nan` in a config) passes every check that compares
    it (`nan <= 0` is false) and would reach the run; every command's config refuses it first."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"--{field.name.replace('_', '-')} must be a number, got nan")


def check_seed(config: Any) -> None:
    """Every command's seed reaches numpy, whose seeds are 0 .. 2**32 - 1; outside that it fails late
    with its own message, which names no option."""
    if not 0 <= config.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32 - 1], got {config.seed}")


def check_max_samples(config: Any) -> None:
    """`--max-samples` is unset (every row) or a positive count."""
    if config.max_samples is not None:
        check_positive(config, "max_samples")


def check_positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def parse_json_objects(config: Any, *names: str) -> None:
    """Options that take a JSON object: JSON text on the command line (`'{"enable_thinking": false}'`),
    a mapping in a YAML config or from Python; each becomes a dict, or stays None when not given."""
    for name in names:
        value = getattr(config, name)
        option_name = f"--{name.replace('_', '-')}"
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"{option_name} is not valid JSON ({err}): {value!r}") from None
        if value is not None and not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
            raise ValueError(f'{option_name} must be a JSON object ({{"name": value, ...}}), got {value!r}')
        setattr(config, name, None if value is None else dict(value))


def takes_json_object(hint: Any) -> bool:
    """Whether a field's type is a dict (an option given as a JSON object), alone or in a `| None`."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return any(typing.get_origin(arg) is dict for arg in (typing.get_args(hint) if union else (hint,)))


def _repeatable(hint: Any) -> bool:
    """Whether a field's type is a list (a repeatable option), alone or in a `| None`."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return any(typing.get_origin(arg) is list for arg in (typing.get_args(hint) if union else (hint,)))


def normalize_keys(values: dict[str, Any], config_cls: type, source: str) -> dict[str, Any]:
    """Map option names (`max-len` or `max_len`) to field names; unknown keys are an error. A
    repeatable option given one value (`stop_token: "###"`, as once on the command line) is a list
    of one; a list or mapping given to a one-value option is an error (click would take its Python
    text, `"['q_proj', 'v_proj']"`), as a mapping is for a repeatable one. JSON-object options take
    a mapping (or JSON text) and check it themselves (`parse_json_objects`)."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    out = {}
    for key, value in values.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in fields:
            raise ValueError(f"{source}: unknown option {key!r} (known: {', '.join(sorted(fields))})")
        repeatable = _repeatable(hints[name])
        if not takes_json_object(hints[name]) and (
            isinstance(value, dict) or (isinstance(value, (list, tuple)) and not repeatable)
        ):
            takes = "a value or a list of values" if repeatable else "one value"
            raise ValueError(f"{source}: option {key!r} takes {takes}, got {value!r}")
        if repeatable and value is not None and not isinstance(value, (list, tuple)):
            value = [value]
        out[name] = value
    return out


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML's) but for its integers in base 8 (`042` is 34) and base 60 (`1:30` is 90),
    and its dates (`2024-06-01` a datetime.date, which no JSON file of a run can hold): those stay
    the text written, which the option's type then reads (`seed: 042` is 42, `split: 042` the split
    "042", a template variable `date_string: 2024-06-01` the text), as on the command line."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        digits = str(self.construct_scalar(node)).lstrip("+-").replace("_", "")
        if ":" in digits or (len(digits) > 1 and digits.startswith("0") and digits.isdigit()):
            return str(self.construct_scalar(node))
        return super().construct_yaml_int(node)


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)
_ConfigLoader.add_constructor("tag:yaml.org,2002:timestamp", _ConfigLoader.construct_yaml_str)


def load_config_file(path: str | Path, config_cls: type) -> dict[str, Any]:
    """Read a YAML config whose keys are option names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_ConfigLoader) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    if hasattr(config_cls, "config_file_values"):  # a command that reads other commands' files
        data = config_cls.config_file_values(data)
    return normalize_keys(data, config_cls, str(path))
