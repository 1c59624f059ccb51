"""Chat formatting: prompt and response token ids of a conversation, the same for every stage.

Model-agnostic (DESIGN §2): the prompt's ids are the chat template applied to the prompt messages
with the generation prompt; the response's ids are what templating the whole conversation (prompt
+ assistant response) adds after them. When a template breaks that prefix property, the response
is the text the template adds after the prompt text, tokenized alone, or failing that the response
content tokenized alone. The response ends at the first stop token (the template's end-of-turn);
whatever the template adds after it is dropped. For preference data the end-of-turn token is
appended when the template adds none, so every untruncated response has `has_eos` true.

Tokenizers without a chat template (base models) get `DEFAULT_CHAT_TEMPLATE`; a `chat_template`
argument (a jinja string or a path to a file holding one) overrides either.

At PPO time the policy generates after `EncodedPrompt.prompt_ids`, stopping at
`ChatFormat.stop_token_ids`, and `ChatFormat.cut_at_stop` ends each generation after its first
stop token: the reward model then sees the same prompt/response token layout it was trained on.

Truncation: the prompt loses its oldest tokens first (from the left, down to `max_prompt_len`,
and always leaving room for one response token under `max_len`); then a response longer than
the room left under `max_len` is cut from the right, losing its end-of-turn token, so its
`has_eos` is false.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .layouts import (
    LayoutOptions,
    PreferenceExample,
    PromptExample,
    SkipReport,
    to_preference_examples,
    to_prompt_examples,
)

logger = logging.getLogger(__name__)

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

ON_LONG_PROMPT = ("truncate", "error")

# A conversation used once per ChatFormat to find which token ends the template's assistant turn.
_PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]


@dataclass
class EncodedPair:
    """Token ids of one preference pair; `*_has_eos` is false when truncation cut the response."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_has_eos: bool
    rejected_ids: list[int]
    rejected_has_eos: bool
    margin: float | None = None
    prompt_truncated: bool = False


@dataclass
class EncodedPrompt:
    """Token ids of one generation prompt, with its messages (for exports) and source row."""

    prompt_ids: list[int]
    messages: list[dict]
    row: int | None = None
    truncated: bool = False


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


def _as_ids(encoded: Any) -> list[int]:
    """apply_chat_template returns a list, or a BatchEncoding/dict (transformers 5's default)."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return list(encoded)


def truncate_left(ids: list[int], limit: int | None) -> tuple[list[int], bool]:
    """Keep the last `limit` ids; (ids, whether any were dropped)."""
    if limit is None or len(ids) <= limit:
        return ids, False
    return ids[len(ids) - limit :], True


def truncate_right(ids: list[int], limit: int | None) -> tuple[list[int], bool]:
    """Keep the first `limit` ids; (ids, whether any were dropped)."""
    if limit is None or len(ids) <= limit:
        return ids, False
    return ids[:limit], True


class ChatFormat:
    """How one tokenizer turns conversations into prompt and response token ids.

    `stop_token_ids` end a response; by default the tokenizer's EOS. If the template's assistant
    turn ends with none of them but with another special token (an instruct template on a base
    tokenizer, e.g. `<|im_end|>` with EOS `<|endoftext|>`), that token is found once on a probe
    conversation and added. `end_of_turn_id` is the token appended to responses that lack one.
    """

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str | Path | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ):
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(tokenizer, chat_template)
        stops = list(stop_token_ids) if stop_token_ids is not None else default_stop_token_ids(tokenizer)
        if not stops:
            raise ValueError("stop_token_ids is empty")
        self.stop_token_ids = stops
        self._warned: set[str] = set()  # fallbacks are reported once, not once per row
        self.end_of_turn_id = self._find_end_of_turn()

    # -- templating ----------------------------------------------------------------------------

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
        )
        return _as_ids(encoded)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _template_suffix(self, messages: list[dict], response: str, prompt_ids: list[int]) -> list[int]:
        """Ids the template adds after the prompt for this response (up to the end of its output)."""
        conversation = [*messages, {"role": "assistant", "content": response}]
        full_ids = self._apply(conversation, add_generation_prompt=False)
        if full_ids[: len(prompt_ids)] == prompt_ids:
            return full_ids[len(prompt_ids) :]
        # The template breaks the prefix property in token space: tokenize what it adds as text.
        prompt_text = self._render(messages, add_generation_prompt=True)
        full_text = self._render(conversation, add_generation_prompt=False)
        if full_text.startswith(prompt_text):
            self._warn_once("chat template breaks the token prefix property; tokenizing its added text alone")
            return self._tokenize(full_text[len(prompt_text) :])
        self._warn_once("chat template does not extend the prompt text; tokenizing the response alone")
        return self._tokenize(response)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    def _find_end_of_turn(self) -> int:
        suffix = self._template_suffix(_PROBE[:1], _PROBE[1]["content"], self.prompt_ids(_PROBE[:1]))
        stops = set(self.stop_token_ids)
        for token in suffix:
            if token in stops:
                return token
        special = set(self.tokenizer.all_special_ids) | {
            i for i, added in self.tokenizer.added_tokens_decoder.items() if added.special
        }
        for token in suffix:
            if token in special:
                logger.warning(
                    "the chat template ends assistant turns with %r, which is not a stop token; adding it",
                    self.tokenizer.convert_ids_to_tokens(token),
                )
                self.stop_token_ids.append(token)
                return token
        return self.stop_token_ids[0]

    # -- encoding ------------------------------------------------------------------------------

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's ids: the template on the prompt messages with the generation prompt."""
        return self._apply(messages, add_generation_prompt=True)

    def response_ids(
        self,
        messages: list[dict],
        response: str,
        prompt_ids: list[int] | None = None,
        add_eos: bool = True,
    ) -> tuple[list[int], bool]:
        """(ids, has_eos) of `response` as the template renders it after the prompt `messages`.

        The ids end at the first stop token. When the template adds none, the end-of-turn token is
        appended if `add_eos` (preference data), else has_eos is false (e.g. a cut-off generation).
        `prompt_ids` are the untruncated prompt ids when the caller already has them.
        """
        if prompt_ids is None:
            prompt_ids = self.prompt_ids(messages)
        ids, has_eos = self.cut_at_stop(self._template_suffix(messages, response, prompt_ids))
        if not has_eos and add_eos:
            return [*ids, self.end_of_turn_id], True
        return ids, has_eos

    def cut_at_stop(self, ids: Sequence[int]) -> tuple[list[int], bool]:
        """(ids up to and including the first stop token, whether there was one).

        Also how a generated response is ended, so that PPO's responses match RM training's.
        """
        stops = set(self.stop_token_ids)
        for i, token in enumerate(ids):
            if token in stops:
                return list(ids[: i + 1]), True
        return list(ids), False

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, or the end-of-turn id when it has none (padding is masked)."""
        pad = self.tokenizer.pad_token_id
        return self.end_of_turn_id if pad is None else pad

    def encode_pair(
        self, example: PreferenceExample, max_len: int | None = None, max_prompt_len: int | None = None
    ) -> EncodedPair:
        """Prompt, chosen and rejected ids of a pair, truncated prompt first, then each response."""
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len must leave room for a prompt and a response token, got {max_len}")
        full_prompt = self.prompt_ids(example.prompt)
        chosen = self.response_ids(example.prompt, example.chosen, full_prompt)[0]
        rejected = self.response_ids(example.prompt, example.rejected, full_prompt)[0]

        prompt_limit = max_prompt_len
        if max_len is not None:  # keep room for at least one response token
            prompt_limit = max_len - 1 if prompt_limit is None else min(prompt_limit, max_len - 1)
        prompt, prompt_cut = truncate_left(full_prompt, prompt_limit)
        room = None if max_len is None else max_len - len(prompt)
        chosen, chosen_cut = truncate_right(chosen, room)
        rejected, rejected_cut = truncate_right(rejected, room)
        return EncodedPair(
            prompt_ids=prompt,
            chosen_ids=chosen,
            chosen_has_eos=not chosen_cut,
            rejected_ids=rejected,
            rejected_has_eos=not rejected_cut,
            margin=example.margin,
            prompt_truncated=prompt_cut,
        )

    def encode_prompt(
        self, example: PromptExample, max_prompt_len: int | None = None, on_long_prompt: str = "truncate"
    ) -> EncodedPrompt:
        """Prompt ids for generation; a prompt over `max_prompt_len` is cut from the left or raises."""
        if on_long_prompt not in ON_LONG_PROMPT:
            raise ValueError(f"on_long_prompt must be one of {ON_LONG_PROMPT}, not {on_long_prompt!r}")
        ids = self.prompt_ids(example.prompt)
        if on_long_prompt == "error" and max_prompt_len is not None and len(ids) > max_prompt_len:
            where = f"row {example.row}" if example.row is not None else "a prompt"
            raise ValueError(
                f"{where} has {len(ids)} prompt tokens, more than max_prompt_len={max_prompt_len} "
                f"(starts {example.prompt[0]['content'][:60]!r}); raise max_prompt_len or use "
                f"on_long_prompt='truncate'"
            )
        ids, cut = truncate_left(ids, max_prompt_len)
        return EncodedPrompt(prompt_ids=ids, messages=example.prompt, row=example.row, truncated=cut)


def encode_preferences(
    dataset: Iterable[Mapping],
    tokenizer: Any,
    layout_options: LayoutOptions | None = None,
    max_len: int | None = None,
    max_prompt_len: int | None = None,
    chat_template: str | Path | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> tuple[list[EncodedPair], SkipReport]:
    """Convert and tokenize a preference dataset; the report counts skipped and truncated rows."""
    examples, report = to_preference_examples(dataset, layout_options)
    chat = ChatFormat(tokenizer, chat_template, stop_token_ids)
    pairs = []
    for example in examples:
        pair = chat.encode_pair(example, max_len=max_len, max_prompt_len=max_prompt_len)
        report.truncated_prompts += pair.prompt_truncated
        report.truncated_responses += (not pair.chosen_has_eos) + (not pair.rejected_has_eos)
        pairs.append(pair)
    return pairs, report


def encode_prompts(
    dataset: Iterable[Mapping],
    tokenizer: Any,
    layout_options: LayoutOptions | None = None,
    max_prompt_len: int | None = None,
    on_long_prompt: str = "truncate",
    chat_template: str | Path | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> tuple[list[EncodedPrompt], SkipReport]:
    """Convert and tokenize a prompt dataset for generation (PPO rollouts, eval)."""
    examples, report = to_prompt_examples(dataset, layout_options)
    chat = ChatFormat(tokenizer, chat_template, stop_token_ids)
    prompts = []
    for example in examples:
        prompt = chat.encode_prompt(example, max_prompt_len=max_prompt_len, on_long_prompt=on_long_prompt)
        report.truncated_prompts += prompt.truncated
        prompts.append(prompt)
    return prompts, report
