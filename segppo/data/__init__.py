"""Preference and prompt data: loading, layout detection, chat formatting and collation.

One code path for RM training, normalizer fitting, PPO and eval, so that the reward model sees
identical text everywhere:

    rows = load_rows("prefs.jsonl")                                      # sources
    pairs, report = encode_preferences(rows, tokenizer, max_len=1024)    # layouts + chat
    batch = collate_preferences(pairs[:8], tokenizer.pad_token_id)       # collate
"""

from .chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatFormat,
    EncodedPair,
    EncodedPrompt,
    default_stop_token_ids,
    encode_preferences,
    encode_prompts,
    generation_config_of,
    resolve_chat_template,
)
from .collate import (
    PreferenceBatch,
    PromptBatch,
    ResponseBatch,
    collate_preferences,
    collate_prompts,
    collate_responses,
    pair_tokens,
)
from .layouts import (
    PREFERENCE_LAYOUTS,
    PROMPT_LAYOUTS,
    LayoutOptions,
    PreferenceExample,
    PromptExample,
    SkipReport,
    detect_preference_layout,
    detect_prompt_layout,
    parse_hh,
    to_preference_examples,
    to_prompt_examples,
)
from .sources import eval_split_name, load_rows, load_splits, select_split, split_train_eval
from .text import segment_texts

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "PREFERENCE_LAYOUTS",
    "PROMPT_LAYOUTS",
    "ChatFormat",
    "EncodedPair",
    "EncodedPrompt",
    "LayoutOptions",
    "PreferenceBatch",
    "PreferenceExample",
    "PromptBatch",
    "PromptExample",
    "ResponseBatch",
    "SkipReport",
    "collate_preferences",
    "collate_prompts",
    "collate_responses",
    "default_stop_token_ids",
    "generation_config_of",
    "pair_tokens",
    "detect_preference_layout",
    "detect_prompt_layout",
    "encode_preferences",
    "encode_prompts",
    "load_rows",
    "load_splits",
    "parse_hh",
    "resolve_chat_template",
    "segment_texts",
    "select_split",
    "split_train_eval",
    "eval_split_name",
    "to_preference_examples",
    "to_prompt_examples",
]
