"""The built-in synthetic task of `segppo demo`: a gold reward, a tiny SFT policy, preference data.

    from segppo.demo import prepare, gold_reward
    data = prepare("runs/demo", "small")          # SFT policy (cached), prompts, preferences
    gold_reward("describe : red fox ; mood : calm", "it is a fox . it feels calm .")   # 2.0

See `segppo.demo.task` for the task's grammar and the gold reward's definition.
"""

from .budget import BUDGETS, DemoBudget, get_budget
from .data import (
    DemoData,
    GoldStats,
    Samples,
    demonstrator_gold,
    label_agreement,
    label_pairs,
    policy_gold,
    prepare,
    sample_preferences,
    sample_responses,
)
from .sft import SFTSettings, default_cache_dir, sft_policy, train_sft
from .task import (
    TASK_VERSION,
    Demonstrator,
    TaskPrompt,
    gold_reward,
    gold_rewards,
    is_heldout,
    parse_prompt,
    phrase_rewards,
    sample_prompts,
    sft_corpus,
)
from .tokenizer import CHAT_TEMPLATE, build_tokenizer

__all__ = [
    "BUDGETS",
    "CHAT_TEMPLATE",
    "TASK_VERSION",
    "DemoBudget",
    "DemoData",
    "Demonstrator",
    "GoldStats",
    "SFTSettings",
    "Samples",
    "TaskPrompt",
    "build_tokenizer",
    "default_cache_dir",
    "demonstrator_gold",
    "get_budget",
    "gold_reward",
    "gold_rewards",
    "is_heldout",
    "label_agreement",
    "label_pairs",
    "parse_prompt",
    "phrase_rewards",
    "policy_gold",
    "prepare",
    "sample_preferences",
    "sample_prompts",
    "sample_responses",
    "sft_corpus",
    "sft_policy",
    "train_sft",
]
