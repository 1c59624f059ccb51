"""Evaluation: generate with one or more policies, score, compare, export (`segppo eval`).

    from segppo.config import EvalConfig
    from segppo.eval import evaluate

    results = evaluate(EvalConfig(policy=["sft", "ppo_run"], prompts="prompts.jsonl", output="eval",
                                  reward_model="rm_run"))
    ppo = results.policies["ppo_run"]
    ppo.score.mean, ppo.score.low, ppo.score.high, ppo.win_rate.rate

Scoring with a Python function instead of a reward model (e.g. a known gold reward):

    def gold_scores(prompts, responses):  # prompts: str, or message lists for longer conversations
        return [gold(p, r) for p, r in zip(prompts, responses)]

    results = evaluate(cfg, scorer_fn=gold_scores)  # cfg without reward_model/scorer

Building blocks, usable alone: `load_eval_prompts` (prompt sets, incl. MT-Bench/Arena-Hard
`turns` and AlpacaEval `instruction` rows), `generate_responses` (batched, per-row seeded
sampling), `RewardModelScorer`/`CallableScorer`, `mean_ci`/`win_rate`, and the benchmark writers
in `segppo.eval.exports`.
"""

from segppo.generation import generate_seeded, row_seed

from .exports import alpaca_eval_rows, arena_hard_rows, markdown_counts, mt_bench_rows, write_exports
from .generation import Generation, generate_responses
from .prompts import EvalPrompt, load_eval_prompts, prompts_from_rows
from .results import EvalResults, PolicyResult
from .runner import evaluate, policy_specs
from .scoring import CallableScorer, RewardModelScorer, ScoreSet, ScoringItem, call_scorer, load_callable
from .stats import MeanCI, WinRate, mean_ci, win_outcomes, win_rate

__all__ = [
    "CallableScorer",
    "EvalPrompt",
    "EvalResults",
    "Generation",
    "MeanCI",
    "PolicyResult",
    "RewardModelScorer",
    "ScoreSet",
    "ScoringItem",
    "WinRate",
    "alpaca_eval_rows",
    "arena_hard_rows",
    "call_scorer",
    "evaluate",
    "generate_responses",
    "generate_seeded",
    "load_callable",
    "load_eval_prompts",
    "markdown_counts",
    "mean_ci",
    "mt_bench_rows",
    "policy_specs",
    "prompts_from_rows",
    "row_seed",
    "win_outcomes",
    "win_rate",
    "write_exports",
]
