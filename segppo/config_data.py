"""The config of `segppo data inspect` (see `segppo.config`, which re-exports it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from segppo.config_fields import (
    CHAT_TEMPLATE_KWARGS_HELP,
    DATA,
    MODEL,
    check_max_samples,
    check_not_nan,
    check_positive,
    check_seed,
    option,
    parse_json_objects,
    resolve_prompt_limit,
)

# ppo train's names for the data and the tokenizer, as `data inspect` names them.
PPO_NAMES = {"prompts": "dataset", "policy": "model"}

# What a dataset is read as: preference pairs (rm train, fit-normalizer, rm eval) or prompts
# (ppo train, eval); auto: pairs when the rows have chosen and rejected responses.
DATA_KINDS = ("auto", "preference", "prompt")


@dataclass
class DataInspectConfig:
    """`segppo data inspect`: a dataset as the training commands will read it."""

    dataset: str = option(
        panel=DATA,
        argument="PATH_OR_NAME",
        help="Preference or prompt data: hub name, .json/.jsonl/.parquet file or folder.",
    )
    kind: str = option(
        "auto",
        panel=DATA,
        help="auto | preference (rm train, fit-normalizer, rm eval) | prompt (ppo train, eval).",
    )
    model: str | None = option(
        None,
        panel=MODEL,
        help="Tokenizer (a model folder or hub name) to render the example and count tokens with "
        "(default: layouts and rows only).",
    )
    split: str = option("train", panel=DATA, help="Training split (--split of the training commands).")
    eval_split: str | None = option(
        None,
        panel=DATA,
        help="Evaluation split of preference data (default: the dataset's own, else held out).",
    )
    eval_fraction: float = option(
        0.02, panel=DATA, help="Fraction held out when the dataset has no eval split."
    )
    seed: int = option(42, panel=DATA, help="Seed of the held-out rows (rm train's --seed).")
    max_samples: int | None = option(None, panel=DATA, help="Use at most this many training rows.")
    prompt_key: str | None = option(None, panel=DATA, help="Column of the prompt (overrides detection).")
    chosen_key: str | None = option(None, panel=DATA, help="Column of the chosen response.")
    rejected_key: str | None = option(None, panel=DATA, help="Column of the rejected response.")
    chat_template: str | None = option(None, panel=DATA, help="Jinja chat template (string or file).")
    chat_template_kwargs: dict[str, Any] | None = option(
        None, panel=DATA, help=f"{CHAT_TEMPLATE_KWARGS_HELP}."
    )
    max_len: int = option(2048, panel=DATA, help="Prompt + response tokens (preference data).")
    max_prompt_len: int | None = option(
        None,
        panel=DATA,
        help="Prompt tokens (default: 27/32 of --max-len, as rm train; ppo train's is 1024).",
    )
    row: int | None = option(
        None,
        panel=DATA,
        help="Training row shown, numbered as in the skip reasons (default: the first kept).",
    )
    length_rows: int = option(1000, panel=DATA, help="Kept training rows whose token lengths are measured.")
    trust_remote_code: bool = option(
        False, panel=MODEL, help="Allow tokenizer code from the hub (off by default)."
    )

    @classmethod
    def config_file_values(cls, values: dict[str, Any]) -> dict[str, Any]:
        """A config file's values: this command's own, or a training command's (`--config rm.yaml`),
        whose data and tokenizer options apply (ppo train's prompts and policy as the dataset, read
        as prompts, and the tokenizer; its own default --max-prompt-len) and whose other options
        (learning rates, output, ...) are left out. A key no command knows is kept, for the usual
        error (a typo)."""
        from segppo.config import FitNormalizerConfig, PPOConfig, RMConfig, RMEvalConfig  # imports this

        own = {f.name for f in dataclasses.fields(cls)}
        training = {
            f.name
            for c in (RMConfig, RMEvalConfig, FitNormalizerConfig, PPOConfig)
            for f in dataclasses.fields(c)
        }
        out: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).lstrip("-").replace("-", "_")
            name = name if name in own else PPO_NAMES.get(name, name)
            if name in own or name not in training:
                out[name] = value
        given = {str(k).lstrip("-").replace("-", "_"): v for k, v in values.items()}
        if "prompts" in given:
            ppo = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
            out.setdefault("kind", "prompt")  # ppo train reads its prompts as prompts, pairs or not
            # and holds them to its own default limit, not 27/32 of --max-len
            if out.get("max_prompt_len") is None:
                out["max_prompt_len"] = ppo["max_prompt_len"]
            # its context is the prompt and --max-new-tokens, whatever the prompt limit
            tokens = given.get("max_new_tokens") or ppo["max_new_tokens"]
            if isinstance(out["max_prompt_len"], int) and isinstance(tokens, int):
                out.setdefault("max_len", out["max_prompt_len"] + tokens)
        return out

    def __post_init__(self) -> None:
        check_not_nan(self)
        check_seed(self)
        check_positive(self, "max_len")
        resolve_prompt_limit(self)
        check_positive(self, "max_prompt_len", "length_rows")
        if self.kind not in DATA_KINDS:
            raise ValueError(f"--kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        check_max_samples(self)
        parse_json_objects(self, "chat_template_kwargs")
        if self.row is not None and self.row < 0:
            raise ValueError(f"--row must be >= 0, got {self.row}")
