"""Which chat template and which stop tokens a tokenizer gets, and how its template treats system
messages: what `ChatFormat` settles once per tokenizer, before encoding any conversation.

Tokenizers without a chat template (base models) get `DEFAULT_CHAT_TEMPLATE`; a `chat_template`
argument (a jinja string, one of the tokenizer's named templates, or a path to a file holding one)
overrides either. Stop tokens default to the tokenizer's EOS and the generation config's
`eos_token_id` (an int or a list; read from `generation_config.json` beside the tokenizer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# For base models: plain "User:"/"Assistant:" turns; each assistant turn ends with the EOS. The
# generation prompt has no trailing space so that the response's leading space tokenizes the same
# way alone as it does inside the whole conversation.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def resolve_chat_template(tokenizer: Any, chat_template: str | Path | None = None) -> str:
    """The jinja template to use: `chat_template` (a template or a file), the tokenizer's, or the default."""
    if chat_template is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        return own or DEFAULT_CHAT_TEMPLATE
    text = str(chat_template)
    if "{{" in text or "{%" in text:
        return text
    named = getattr(tokenizer, "chat_template", None)
    if isinstance(named, dict) and text in named:  # one of the tokenizer's named templates
        return named[text]
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"chat_template {text!r} is neither a jinja template nor an existing file")
    return path.read_text()


def default_stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The tokenizer's EOS, then the generation config's EOS ids (an int or a list), without repeats."""
    ids = [tokenizer.eos_token_id]
    config_ids = getattr(generation_config, "eos_token_id", None)
    if config_ids is not None:
        ids += config_ids if isinstance(config_ids, (list, tuple)) else [config_ids]
    ids = list(dict.fromkeys(int(i) for i in ids if i is not None))
    if not ids:
        raise ValueError(
            "the tokenizer has no EOS token and no generation config names one: pass stop_token_ids"
        )
    return ids


def generation_config_of(tokenizer: Any) -> Any:
    """The `generation_config.json` beside a tokenizer loaded from a local folder, or None.

    Chat checkpoints list their extra stop ids there (Phi-3: `[32000, 32001, 32007]`, Llama-3.1:
    `[128001, 128008, 128009]`); a hub name's is fetched like its tokenizer was.
    """
    name = getattr(tokenizer, "name_or_path", None)
    if not name:
        return None
    from transformers import GenerationConfig

    folder = Path(str(name)).expanduser()
    try:
        if folder.is_dir():
            if not (folder / "generation_config.json").is_file():
                return None
            return GenerationConfig.from_pretrained(folder)
        return GenerationConfig.from_pretrained(str(name))
    except (OSError, ValueError):  # no generation_config.json for this model, or not cached
        return None


def _as_ids(encoded: Any) -> list[int]:
    """apply_chat_template returns a list, or a BatchEncoding/dict (transformers 5's default)."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return list(encoded)


SYSTEM_HANDLING = ("keep", "fold")
_SYSTEM_PROBE_TEXT = "Answer in one word."
# A conversation used once per ChatFormat to find which token ends the template's assistant turn.
_PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]


def probe_system_handling(
    tokenizer: Any, template: str, template_kwargs: Mapping[str, Any] | None = None
) -> tuple[str, str | None]:
    """("keep", None), or ("fold", why) when the template does not render a system message: it
    raises on one (Gemma-2: "System role not supported") or renders without it (Phi-3-mini, April
    2024: no branch for the role). Either way its text belongs in the first user turn. The probe
    renders with the template variables the conversations will get (`template_kwargs`)."""
    from jinja2 import TemplateError

    probe = [{"role": "system", "content": _SYSTEM_PROBE_TEXT}, _PROBE[0]]
    try:
        text = tokenizer.apply_chat_template(
            probe,
            chat_template=template,
            add_generation_prompt=True,
            tokenize=False,
            **(template_kwargs or {}),
        )
    except TemplateError:
        return "fold", "rejects system messages"
    if _SYSTEM_PROBE_TEXT in text:
        return "keep", None
    return "fold", "renders without system messages"


def unread_template_variables(template: str, names: Iterable[str]) -> list[str]:
    """The names of `names` that `template` never reads: Jinja renders a variable no expression
    names as if it were not given (a typo, or another model family's variable). A template plain
    Jinja cannot parse (an extension's tags) reads them all, as far as this says."""
    from jinja2 import Environment, TemplateSyntaxError, meta

    try:
        parsed = Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except TemplateSyntaxError:
        return []
    read = meta.find_undeclared_variables(parsed)
    return [name for name in names if name not in read]


# A string literal the template looks for in a value: `'</think>' in content`, `.split('</think>')`,
# `.startswith('<tool_response>')`.
_PARSED_LITERAL = re.compile(
    r"""\.(?:r?split|startswith|endswith|r?partition)\(\s*(['"])(.+?)\1|(['"])(.+?)\3\s+in\s"""
)


def content_control_tokens(tokenizer: Any, template: str) -> list[str] | None:
    """The added tokens message content must not produce, as `apply_chat_template`'s
    `chat_control_tokens`, when transformers' own choice (special tokens and the added tokens the
    template writes) is wrong for this template; else None.

    It misses added tokens that are not special yet strip the whitespace beside them (`lstrip`,
    `rstrip`): Phi-3 declares `</s>` so, and content `</s> new` matched as that token comes back as
    `</s>new`. Encoded as text, such content keeps its every character.

    It wrongly includes the non-special added tokens the template parses out of message content:
    Qwen3 splits an assistant message at `</think>` into reasoning and answer. Control-token text
    in content is wrapped in markers that hide it from the template's `split` and `strip`, so the
    reasoning would render with extra newlines, unlike what the model generates. Such content keeps
    these tokens, as the model's own tokenizer reads them.
    """
    added = [t for t in tokenizer.added_tokens_decoder.values() if not t.special]
    stripping = {t.content for t in added if t.lstrip or t.rstrip}
    literals = [m.group(2) or m.group(4) for m in _PARSED_LITERAL.finditer(template)]
    parsed = {t.content for t in added if any(t.content in literal for literal in literals)} - stripping
    if not stripping and not parsed:
        return None
    own = getattr(tokenizer, "chat_control_tokens", None)
    if own is None:  # what transformers infers: the added tokens written in the template
        own = [t.content for t in added if t.content in template and not t.content.isspace()]
    return sorted((set(own) - parsed) | stripping)


@contextmanager
def chat_control_tokens(tokenizer: Any, tokens: list[str] | None) -> Iterator[None]:
    """`tokenizer.chat_control_tokens` set to `tokens` inside the block (nothing when None), put back
    after it: the tokenizer is shared and is saved with whatever it holds."""
    if tokens is None:
        yield
        return
    saved = getattr(tokenizer, "chat_control_tokens", None)
    tokenizer.chat_control_tokens = tokens
    try:
        yield
    finally:
        tokenizer.chat_control_tokens = saved
