"""The configs of `segppo eval` and `segppo demo` (see `segppo.config`, which re-exports them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segppo.config_fields import (
    CHAT_TEMPLATE_KWARGS_HELP,
    DATA,
    DEMO,
    EVALUATION,
    GENERATION,
    MEMORY,
    MODEL,
    RUN,
    SEGMENTS,
    check_max_samples,
    check_normalizer_options,
    check_not_nan,
    check_positive,
    check_seed,
    option,
    parse_json_objects,
)
from segppo.kernels import GRANULARITIES


@dataclass
class EvalConfig:
    """`segppo eval`: sample responses from one or more policies, score them, compare, export.

    Exactly one scorer: `reward_model` (a segppo RM folder or run folder; scores are its sequence
    score and the PPO-normalized reward) or `scorer` (`module:function` or `file.py:function`, a
    Python callable `f(prompts, responses) -> list[float]`). `baseline` names (or is the path of)
    the policy the others are compared against; default: the first policy when there are several.
    """

    policy: list[str] = option(
        panel=MODEL, help="Policy folder, PPO run folder or hub name; repeat to compare several."
    )
    prompts: str = option(
        panel=DATA,
        help="Prompt data: PPO's layouts, MT-Bench/Arena-Hard question.jsonl (`turns`) "
        "or AlpacaEval (`instruction`) rows.",
    )
    output: str = option(
        panel=RUN, help="Folder for results.json, responses/, the benchmark exports and the plot."
    )
    reward_model: str | None = option(
        None,
        panel=SEGMENTS,
        help="Score with this reward model (its sequence score and PPO-normalized reward).",
    )
    scorer: str | None = option(
        None,
        panel=SEGMENTS,
        help="Score with a Python callable module:function or file.py:function, "
        "f(prompts, responses) -> scores.",
    )
    baseline: str | None = option(
        None,
        panel=EVALUATION,
        help="Policy to compute win rates against: a --name, a --policy, or another policy path "
        "(default: the first).",
    )
    name: list[str] | None = option(
        None, panel=EVALUATION, help="Name of each --policy, in order (default: the folder's last component)."
    )
    num_samples: int = option(1, panel=GENERATION, help="Responses per prompt per policy.")
    turns: int = option(1, panel=EVALUATION, help="1, or 2 for MT-Bench-style two-turn prompts.")
    split: str = option("train", panel=DATA, help="Split of the prompt data.")
    max_samples: int | None = option(None, panel=DATA, help="Use at most this many prompts.")
    prompt_key: str | None = option(None, panel=DATA, help="Column of the prompt (overrides detection).")
    chat_template: str | None = option(
        None, panel=DATA, help="Jinja template (default: the RM's when it shares the policy's tokenizer)."
    )
    chat_template_kwargs: dict[str, Any] | None = option(
        None,
        panel=DATA,
        help=f"{CHAT_TEMPLATE_KWARGS_HELP} (default: the RM's when it shares the policy's tokenizer).",
    )
    max_prompt_len: int = option(1024, panel=DATA, help="Prompt tokens (see --long-prompts).")
    long_prompts: str = option("error", panel=DATA, help="error | truncate: prompts over --max-prompt-len.")
    max_new_tokens: int = option(1024, panel=GENERATION, help="Generation limit per response (per turn).")
    temperature: float = option(1.0, panel=GENERATION, help="Sampling temperature; 0 decodes greedily.")
    top_p: float = option(
        1.0, panel=GENERATION, help="Nucleus sampling mass (not applied at --temperature 0)."
    )
    stop_token: list[str] | None = option(None, panel=GENERATION, help="Extra stop token (repeatable).")
    batch_size: int = option(
        16, panel=MEMORY, help="Prompts per generate call and responses per scoring forward."
    )
    seed: int = option(
        42, panel=GENERATION, help="Sampling seed; every policy draws the same numbers per prompt."
    )
    rollout_engine: str = option(
        "hf",
        panel=GENERATION,
        help="hf | vllm: the generation engine. vllm (the vllm extra): reruns give the same responses, "
        "but not the hf engine's samples.",
    )
    normalizer: str | None = option(
        None, panel=SEGMENTS, help="normalizer.json (default: the RM's own, if any)."
    )
    normalize: bool = option(
        True, panel=SEGMENTS, help="Location-aware normalization of segment rewards (as PPO)."
    )
    reward_mean: float | None = option(None, panel=SEGMENTS, help="Bandit normalizer mean (as PPO).")
    reward_std: float | None = option(None, panel=SEGMENTS, help="Bandit normalizer std (as PPO).")
    sigma_floor: float | None = option(
        None, panel=SEGMENTS, help="Normalizer σ floor (default: the normalizer's)."
    )
    segmenter: str | None = option(None, panel=SEGMENTS, help="Override the RM's recorded segmenter.")
    granularity: str | None = option(None, panel=SEGMENTS, help="For imported RMs that record none.")
    threshold: float | None = option(
        None, panel=SEGMENTS, help="Entropy threshold, with --granularity segment."
    )
    bf16: bool = option(False, panel=MEMORY, help="Load policies and RM in bfloat16.")
    plot: bool = option(True, panel=EVALUATION, help="Write score_distributions.png (needs matplotlib).")
    trust_remote_code: bool = option(
        False, panel=MODEL, help="Allow model code from the hub (off by default)."
    )

    def __post_init__(self) -> None:
        check_not_nan(self)
        check_seed(self)
        if isinstance(self.policy, str):
            self.policy = [self.policy]
        if isinstance(self.name, str):
            self.name = [self.name]
        if isinstance(self.stop_token, str):
            self.stop_token = [self.stop_token]
        parse_json_objects(self, "chat_template_kwargs")
        if not self.policy:
            raise ValueError("--policy is required (repeat it to compare several policies)")
        check_positive(self, "num_samples", "max_prompt_len", "max_new_tokens", "batch_size")
        if self.reward_model is not None and self.scorer is not None:
            raise ValueError("pass either --reward-model or --scorer, not both")
        if self.scorer is not None:
            module, _, function = self.scorer.partition(":")
            if not module or not function:
                raise ValueError(
                    f"--scorer must be module:function (e.g. mypkg.rewards:score), got {self.scorer!r}"
                )
        if self.turns not in (1, 2):
            raise ValueError(f"--turns must be 1 or 2, got {self.turns}")
        if self.rollout_engine not in ("hf", "vllm"):
            raise ValueError(f"--rollout-engine must be hf or vllm, got {self.rollout_engine!r}")
        if self.long_prompts not in ("error", "truncate"):
            raise ValueError(f"--long-prompts must be error or truncate, got {self.long_prompts!r}")
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"--temperature must be >= 0 (0 decodes greedily), got {self.temperature}")
        if self.greedy and self.num_samples > 1:
            raise ValueError(
                f"--num-samples {self.num_samples} with --temperature 0: greedy decoding would give "
                f"{self.num_samples} identical responses per prompt; use --num-samples 1 or a positive "
                "--temperature"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.name is not None and len(self.name) != len(self.policy):
            raise ValueError(
                f"give one --name per --policy: {len(self.name)} names for {len(self.policy)} policies"
            )
        check_normalizer_options(self)
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ValueError(f"--granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"--threshold must be >= 0, got {self.threshold}")
        check_max_samples(self)

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    @property
    def greedy(self) -> bool:
        """--temperature 0: greedy decoding, as `segppo.generation.SamplingConfig.greedy` (no top-p)."""
        return self.temperature == 0


# The demo's gold tasks (`segppo.demo.task`): one-token decisions | phrases right or wrong as a whole.
DEMO_TASKS = ("animals", "pairs")
# The demo's policies: the synthetic task's tiny SFT model | SmolLM2-135M-Instruct (`segppo.demo.smollm2`).
DEMO_MODELS = ("synthetic", "smollm2")


@dataclass
class DemoConfig:
    """`segppo demo`: the whole method end to end on the built-in synthetic task (no network, CPU)."""

    output: str = option("segppo-demo", panel=RUN, help="Folder for every artifact of the run.")
    model: str = option(
        "synthetic",
        panel=DEMO,
        help="synthetic (the built-in task, no network) | smollm2 (SmolLM2-135M-Instruct from the package "
        "index, sentiment gold judge; the real extra).",
    )
    budget: str = option(
        "default",
        panel=DEMO,
        help="small (a pipeline check) | default (synthetic: at most 5 minutes on 2 CPU cores; smollm2: 15) "
        "| pairs (--task pairs: RMs from a backbone that learned the task's lookup).",
    )
    compare: list[str] | None = option(
        None, panel=DEMO, help="Granularities to compare, e.g. bandit,token,segment."
    )
    seeds: int | None = option(
        None, panel=DEMO, help="Seeds per setting (default: 3 with --compare, else 1)."
    )
    task: str = option(
        "animals", panel=DEMO, help="Gold task: animals (one-token decisions) | pairs (multi-token)."
    )
    seed: int = option(0, panel=RUN, help="First seed (the task data, SFT sampling and each setting's runs).")
    cache_dir: str | None = option(
        None,
        panel=RUN,
        help="SFT policy / converted SmolLM2 cache (default ~/.cache/segppo/demo, ~/.cache/segppo/models).",
    )
    threads: int | None = option(None, panel=MEMORY, help="torch CPU threads.")

    def __post_init__(self) -> None:
        check_not_nan(self)
        check_seed(self)
        if isinstance(self.compare, str):
            self.compare = [self.compare]
        if self.compare is not None:  # `--compare a,b` and `--compare a --compare b` both work
            self.compare = [g.strip() for item in self.compare for g in item.split(",") if g.strip()]
        for i, granularity in enumerate(self.compare or []):
            if granularity not in GRANULARITIES:
                raise ValueError(f"--compare takes granularities from {GRANULARITIES}, got {granularity!r}")
            if granularity in self.compare[:i]:  # one folder and one row per granularity and seed
                raise ValueError(f"--compare names {granularity} twice")
        if self.seeds is not None:
            check_positive(self, "seeds")
        if self.task not in DEMO_TASKS:
            raise ValueError(f"--task takes one of {DEMO_TASKS}, got {self.task!r}")
        if self.model not in DEMO_MODELS:
            raise ValueError(f"--model takes one of {DEMO_MODELS}, got {self.model!r}")
        if self.model != "synthetic" and (self.compare or self.task != "animals" or self.seeds):
            raise ValueError("--compare, --seeds and --task are for the synthetic demo, not --model smollm2")
        # `--budget pairs` trains its RMs' backbone on that task's lookup (10 minutes)
        if self.model == "synthetic" and self.budget == "pairs" and self.task != "pairs":
            raise ValueError(f"--budget pairs is for --task pairs, got --task {self.task}")
        if self.threads is not None:
            check_positive(self, "threads")
