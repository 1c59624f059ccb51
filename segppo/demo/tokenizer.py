"""The demo's word-level tokenizer: one token per task word, ChatML turns, `<|im_end|>` as EOS.

Built with `tokenizers` (WordLevel over the task vocabulary, case-sensitive: prompts' capitalised
values are words of their own; split on whitespace and punctuation) and saved with the SFT policy,
so every later stage reads the task through segppo's ordinary `ChatFormat` with no demo-specific
code:

    <|im_start|> user describe : Red Fox ; mood : Calm <|im_end|> <|im_start|> assistant   (prompt)
    animal fox . mood calm . <|im_end|>                                                    (response)

Words outside the task's vocabulary become `<unk>`.
The template's newlines are whitespace to the pre-tokenizer, so the prompt's ids are a prefix of
the whole conversation's ids and the response ends at the end-of-turn token, the EOS.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .task import vocabulary

PAD, UNK, IM_START, IM_END = "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, UNK, IM_START, IM_END)
ROLE_WORDS = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_prompt(prompt: str) -> str:
    """The text `CHAT_TEMPLATE` renders for one user prompt with the generation prompt."""
    return f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n"


def render_conversation(prompt: str, response: str) -> str:
    """The text `CHAT_TEMPLATE` renders for a user prompt and the assistant's response."""
    return f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n{response}{IM_END}\n"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The task's tokenizer (128 tokens); deterministic."""
    tokens = [*SPECIAL_TOKENS, *ROLE_WORDS, *vocabulary()]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=IM_START,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
