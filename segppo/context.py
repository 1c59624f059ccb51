"""A model's context: how many tokens (prompt plus response) it reads, and the one check of it.

Both generation engines and the preflight of `ppo train` and `eval` ask here, so that a run whose
prompts plus new tokens cannot fit the model says so in one line, whichever engine it names, before
any model is loaded. (Without it vLLM refused with a pydantic error on its `max_model_len`, while
Hugging Face `generate` ran a RoPE model past its trained positions with a warning and failed
inside GPT-2's position embeddings.)

The context is read from the model's transformers config (its text config, for a multimodal one):
the smallest of the fields that bound positions, the same fields vLLM derives its `max_model_len`
from, so a length that fits here never trips vLLM's own check. transformers maps a model's own name
for it onto `max_position_embeddings` (GPT-2's `n_positions`, ...); the other names are those of
configs that keep their own. A rope-scaling factor does not widen the context here (vLLM applies
some): segppo stays within the positions the model was trained on. A config with none of the
fields (a state-space model) has no limit to check.
"""

from __future__ import annotations

from dataclasses import dataclass

# The fields vLLM derives its limit from (0.32: `derive_max_model_len_and_key`), the smallest
# winning. Left out: Cohere's `model_max_length`, which vLLM lets override the others upwards.
CONTEXT_FIELDS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)


class ContextError(ValueError):
    """Prompt plus new tokens do not fit a model's context (or an engine's `max_model_len`)."""


def context_length(config) -> tuple[int, str] | None:
    """(tokens, field) of a transformers config's context, or None when no field bounds it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found: list[tuple[int, str]] = []
    for field in CONTEXT_FIELDS:
        value = getattr(text, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.append((value, field))
    attribute_map = getattr(text, "attribute_map", {})
    # GPT-2 answers to both names (one is an alias of the other): report the config's own name
    found = [(tokens, attribute_map.get(field, field)) for tokens, field in found]
    return min(found) if found else None


@dataclass(frozen=True)
class Context:
    """At most `tokens` tokens per sequence; `field` and `model` say where the number came from."""

    tokens: int
    field: str
    model: str

    def check(self, prompt_tokens: int, new_tokens: int, *, prompt: str, new: str) -> None:
        """Raise `ContextError` when `prompt_tokens + new_tokens` exceed the context; `prompt` and
        `new` name the two numbers in the message (an option, or a row of a batch)."""
        total = prompt_tokens + new_tokens
        if total > self.tokens:
            raise ContextError(
                f"{prompt} {prompt_tokens} + {new} {new_tokens} = {total} tokens do not fit the context "
                f"of {self.model} ({self.tokens} tokens, its {self.field})"
            )


def config_context(config, model: str) -> Context | None:
    """The `Context` of a loaded config (`model` names it in messages), or None without a limit."""
    found = context_length(config)
    return None if found is None else Context(found[0], found[1], model)


def model_context(name_or_path: str, *, trust_remote_code: bool = False, label: str = "") -> Context | None:
    """The `Context` of a model folder or hub name (its config.json only; no weights are read).
    `label` (e.g. "--policy") goes before the name in messages."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return config_context(config, f"{label} {name_or_path}".strip())
