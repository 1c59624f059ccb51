"""One dataclass per command (the paper's runs as presets are in `segppo.presets`).

Each field is one CLI option of its command (`segppo.cli.options.config_options` makes them):
the option is the field name with `-` for `_`, its type and default are the field's, and its
`--help` panel and help are given with `option(default, panel=DATA, help=...)` (the panels are in
`segppo.config_fields.PANELS`; a test fails for a field without one). So a YAML `--config` file,
a preset and the flags all speak the same keys, and trainers take these objects, never parsed CLI
arguments. The field machinery is in `segppo.config_fields`, the eval and demo configs in
`segppo.config_eval`, `data inspect`'s in `segppo.config_data`; all are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segppo.config_data import DATA_KINDS, DataInspectConfig  # re-exported
from segppo.config_eval import DEMO_TASKS, DemoConfig, EvalConfig  # re-exported
from segppo.config_fields import (  # re-exported
    CHAT_TEMPLATE_KWARGS_HELP,
    DATA,
    GENERATION,
    MEMORY,
    MODEL,
    NORMALIZER_FIT,
    OPTIMISATION,
    PPO,
    PROMPT_SHARE,
    RUN,
    SEGMENTS,
    check_max_samples,
    check_normalizer_options,
    check_not_nan,
    check_positive,
    check_schedule_options,
    check_seed,
    load_config_file,
    normalize_keys,
    option,
    parse_json_objects,
    resolve_prompt_limit,
)
from segppo.config_memory import MemoryOptions, PPOMemoryOptions  # re-exported
from segppo.kernels import GRANULARITIES, resolve_granularity
from segppo.presets import FIT_NORMALIZER_PRESETS, PPO_PRESETS, RM_PRESETS, preset_values  # re-exported
from segppo.segment_stats import DEFAULT_SEGMENT_LENGTH

# The choices of PPO options, named here so that the configs (and so eval and the CLI) never import
# the PPO package; `segppo.ppo.advantages` and `segppo.ppo.losses` re-export them.
AUTO_THRESHOLD = "auto"


def parse_threshold(value) -> float | str:
    """`--entropy-threshold`: a number >= 0, or `auto` (chosen from the data by `rm train`)."""
    if isinstance(value, str) and value.strip().lower() == AUTO_THRESHOLD:
        return AUTO_THRESHOLD
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--entropy-threshold must be a number >= 0 or auto, got {value!r}") from None
    if not threshold >= 0 or threshold == float("inf"):
        raise ValueError(f"--entropy-threshold must be a number >= 0 or auto, got {value!r}")
    return threshold


ESTIMATORS = ("gae", "rloo", "grpo", "reinforce++")
GROUP_ESTIMATORS = ("rloo", "grpo")  # need n_samples_per_prompt >= 2
LOSS_AGGREGATIONS = ("token-mean", "seq-mean")


@dataclass
class RMConfig(MemoryOptions):
    """`segppo rm train`: a segment-, token- or bandit-level reward model from preference pairs."""

    model: str = option(panel=MODEL, help="Backbone the RM starts from: a causal LM (hub name or folder).")
    dataset: str = option(panel=DATA, help="Preference data: hub name, .json/.jsonl/.parquet file or folder.")
    output: str = option(panel=RUN, help="Run folder (model/, state/, metrics.jsonl).")
    granularity: str = option("segment", panel=SEGMENTS, help="segment | token | bandit.")
    entropy_threshold: str = option(
        "auto",
        panel=SEGMENTS,
        help="Segment ends where the segmenter's entropy exceeds this; auto: the entropy quantile that gives "
        "--segment-length tokens per segment on a sample of the training responses.",
    )
    segment_length: float = option(
        DEFAULT_SEGMENT_LENGTH,
        panel=SEGMENTS,
        help="With --entropy-threshold auto: the mean tokens per segment the threshold is chosen for.",
    )
    segment_sample: int = option(
        256,
        panel=SEGMENTS,
        help="Training pairs whose responses the segment statistics (and an auto threshold) are measured "
        "on, in one segmenter pass before training.",
    )
    segmenter: str | None = option(None, panel=SEGMENTS, help="Entropy model (default: --model).")
    split: str = option("train", panel=DATA, help="Training split.")
    eval_split: str | None = option(
        None, panel=DATA, help="Evaluation split (default: the dataset's own, else held out)."
    )
    eval_fraction: float = option(
        0.02, panel=DATA, help="Fraction held out when the dataset has no eval split."
    )
    max_samples: int | None = option(None, panel=DATA, help="Use at most this many training rows.")
    prompt_key: str | None = option(None, panel=DATA, help="Column of the prompt (overrides detection).")
    chosen_key: str | None = option(None, panel=DATA, help="Column of the chosen response.")
    rejected_key: str | None = option(None, panel=DATA, help="Column of the rejected response.")
    strict: bool = option(
        False, panel=DATA, help="A malformed data row is an error naming it (default: skip and count)."
    )
    chat_template: str | None = option(None, panel=DATA, help="Jinja chat template (string or file).")
    chat_template_kwargs: dict[str, Any] | None = option(
        None, panel=DATA, help=f"{CHAT_TEMPLATE_KWARGS_HELP} (recorded in segppo.json)."
    )
    max_len: int = option(2048, panel=DATA, help="Prompt + response tokens.")
    max_prompt_len: int | None = option(
        None,
        panel=DATA,
        help="Prompt tokens, truncated from the left first (default: 27/32 of --max-len, 1728 of 2048).",
    )
    epochs: int = option(1, panel=OPTIMISATION, help="Passes over the training pairs.")
    max_steps: int | None = option(
        None,
        panel=OPTIMISATION,
        help="Optimizer steps to run; overrides --epochs (stops early, or continues into more epochs).",
    )
    lr: float = option(1e-6, panel=OPTIMISATION, help="Peak learning rate.")
    warmup_ratio: float = option(
        0.03, panel=OPTIMISATION, help="Share of the steps spent warming the learning rate up."
    )
    min_lr_ratio: float = option(0.1, panel=OPTIMISATION, help="Cosine floor as a fraction of --lr.")
    weight_decay: float = option(0.0, panel=OPTIMISATION, help="AdamW weight decay.")
    grad_clip: float = option(1.0, panel=OPTIMISATION, help="Clip the gradient norm to this.")
    batch_size: int = option(128, panel=OPTIMISATION, help="Pairs per optimizer step over all ranks.")
    micro_batch_size: int = option(8, panel=MEMORY, help="Pairs per forward on one rank.")
    margin: bool = option(False, panel=SEGMENTS, help="Use the data's score margins in the loss.")
    zero_stage: int = option(
        2, panel=MEMORY, help="DeepSpeed ZeRO stage 0-3 (one rank trains 1 and 2 as 0: nothing to partition)."
    )
    bf16: bool = option(False, panel=MEMORY, help="Train in bfloat16.")
    gradient_checkpointing: bool = option(
        False, panel=MEMORY, help="Recompute activations in the backward pass (less memory, slower)."
    )
    packing: bool = option(
        False,
        panel=MEMORY,
        help="Pack each micro-batch's chosen and rejected sequences into rows kept apart by the "
        "attention mask, one row under flash attention (same loss, fewer padding tokens).",
    )
    eval_every: int = option(0, panel=RUN, help="Evaluate every N steps (0: at the end only).")
    save_every: int = option(0, panel=RUN, help="Checkpoint every N steps (0: at the end only).")
    save_total_limit: int = option(
        2, panel=RUN, help="Training states kept in state/, newest first (0: all)."
    )
    seed: int = option(
        42, panel=RUN, help="Seed of the data order, the held-out rows and the initialisation."
    )
    nproc: int = option(1, panel=MEMORY, help="Local ranks to run (DeepSpeed).")
    resume: bool = option(False, panel=RUN, help="Continue the run in --output from its last state.")
    trust_remote_code: bool = option(
        False, panel=MODEL, help="Allow model code from the hub (off by default)."
    )
    tensorboard: bool = option(False, panel=RUN, help="Also log to TensorBoard (output/tensorboard).")
    wandb_project: str | None = option(None, panel=RUN, help="Also log to this W&B project.")

    def __post_init__(self) -> None:
        check_not_nan(self)
        check_seed(self)
        check_positive(self, "max_len")
        resolve_prompt_limit(self)
        check_positive(self, "batch_size", "micro_batch_size", "max_len", "max_prompt_len", "epochs", "nproc")
        check_max_samples(self)
        parse_json_objects(self, "chat_template_kwargs")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"--granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        self.entropy_threshold = parse_threshold(self.entropy_threshold)
        if not self.segment_length > 0:
            raise ValueError(f"--segment-length must be positive, got {self.segment_length}")
        check_positive(self, "segment_sample")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        check_schedule_options(self)
        self.check_memory_options()

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    @property
    def resolved_granularity(self) -> str:
        """The granularity after the paper's sentinel thresholds (0: token, 1000: bandit)."""
        if self.entropy_threshold == AUTO_THRESHOLD:
            return self.granularity
        return resolve_granularity(self.granularity, self.entropy_threshold)

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step, so that the global batch ignores the rank count."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ValueError(
                f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size "
                f"{self.micro_batch_size} × {world_size} rank(s)"
            )
        return self.batch_size // per_step


@dataclass
class RMEvalConfig:
    """`segppo rm eval`: pairwise accuracy and score statistics of a reward model."""

    model: str = option(panel=MODEL, help="Reward model folder (or run folder) or hub name.")
    dataset: str = option(panel=DATA, help="Preference data.")
    split: str = option(
        "train", panel=DATA, help="Split evaluated (the RM's held-out rows when it is its training split)."
    )
    max_samples: int | None = option(None, panel=DATA, help="Use at most this many rows.")
    prompt_key: str | None = option(None, panel=DATA, help="Column of the prompt (overrides detection).")
    chosen_key: str | None = option(None, panel=DATA, help="Column of the chosen response.")
    rejected_key: str | None = option(None, panel=DATA, help="Column of the rejected response.")
    max_len: int = option(2048, panel=DATA, help="Prompt + response tokens.")
    max_prompt_len: int | None = option(None, panel=DATA, help="Prompt tokens (default: 27/32 of --max-len).")
    batch_size: int = option(8, panel=MEMORY, help="Pairs per forward.")
    segmenter: str | None = option(
        None, panel=SEGMENTS, help="Override the segmenter recorded in segppo.json."
    )
    granularity: str | None = option(None, panel=SEGMENTS, help="For imported RMs that record none.")
    threshold: float | None = option(
        None, panel=SEGMENTS, help="Entropy threshold, with --granularity segment."
    )
    trust_remote_code: bool = option(
        False, panel=MODEL, help="Allow model code from the hub (off by default)."
    )

    def __post_init__(self) -> None:
        check_not_nan(self)
        check_positive(self, "max_len")
        resolve_prompt_limit(self)
        check_positive(self, "batch_size", "max_len", "max_prompt_len")
        check_max_samples(self)


@dataclass
class FitNormalizerConfig:
    """`segppo fit-normalizer`: the location-aware normalizer of a reward model (DESIGN.md §3.3).

    Two modes: fit (`reward_model` + `dataset`: score the segments of `samples` preference pairs)
    or import (`from_param_json` + `key`: the paper's published fits). Either writes `output`, and
    with `into_rm` also the `normalizer` field of the reward model folder's `segppo.json`.
    """

    reward_model: str | None = option(
        None, panel=MODEL, help="Reward model folder (or run folder) or hub name to fit."
    )
    dataset: str | None = option(None, panel=DATA, help="Preference data whose responses are scored.")
    output: str = option("normalizer.json", panel=RUN, help="Where to write normalizer.json.")
    samples: int = option(
        60000, panel=DATA, help="Preference pairs to score (chosen and rejected responses)."
    )
    split: str = option("train", panel=DATA, help="Split whose pairs are scored.")
    seed: int = option(42, panel=DATA, help="Seed of the shuffle that picks the pairs.")
    prompt_key: str | None = option(None, panel=DATA, help="Column of the prompt (overrides detection).")
    chosen_key: str | None = option(None, panel=DATA, help="Column of the chosen response.")
    rejected_key: str | None = option(None, panel=DATA, help="Column of the rejected response.")
    max_len: int = option(2048, panel=DATA, help="Prompt + response tokens.")
    max_prompt_len: int | None = option(None, panel=DATA, help="Prompt tokens (default: 27/32 of --max-len).")
    batch_size: int = option(8, panel=MEMORY, help="Pairs per forward on one rank.")
    min_bin_count: int = option(
        10,
        panel=NORMALIZER_FIT,
        help="weighted: the fewest scores in a bin | paper: bins with fewer are left out of the fit.",
    )
    fit_mode: str = option(
        "weighted",
        panel=NORMALIZER_FIT,
        help="weighted: bins of equal counts along ln p (p = 1 apart), weighted by their counts, centred on "
        "the data | paper: the paper's unweighted Huber fit of 3-decimal bins of p.",
    )
    min_r2: float = option(
        0.2,
        panel=NORMALIZER_FIT,
        help="With --fit-mode weighted: a line of lower R² is replaced by a constant.",
    )
    sigma_floor: float = option(1e-2, panel=NORMALIZER_FIT, help="Lower bound of the fitted std.")
    plot: str | None = option(
        None, panel=NORMALIZER_FIT, help="Also save a PNG of the fit (needs matplotlib)."
    )
    into_rm: bool = option(
        False,
        panel=NORMALIZER_FIT,
        help="Also write the normalizer into the reward model folder's segppo.json.",
    )
    segmenter: str | None = option(
        None, panel=SEGMENTS, help="Override the segmenter recorded in segppo.json."
    )
    granularity: str | None = option(None, panel=SEGMENTS, help="For imported RMs that record none.")
    threshold: float | None = option(
        None, panel=SEGMENTS, help="Entropy threshold, with --granularity segment."
    )
    bf16: bool = option(False, panel=MEMORY, help="Run the models in bfloat16.")
    nproc: int = option(1, panel=MEMORY, help="Local ranks to split the samples across.")
    trust_remote_code: bool = option(
        False, panel=MODEL, help="Allow model code from the hub (off by default)."
    )
    from_param_json: str | None = option(
        None, panel=NORMALIZER_FIT, help="Import the paper's param.json instead of fitting."
    )
    key: str | None = option(
        None, panel=NORMALIZER_FIT, help="Entry of --from-param-json: model/dataset/method/agg/threshold."
    )

    def __post_init__(self) -> None:
        check_not_nan(self)
        check_seed(self)
        check_positive(self, "max_len")
        resolve_prompt_limit(self)
        check_positive(self, "samples", "batch_size", "max_len", "max_prompt_len", "min_bin_count", "nproc")
        if not self.sigma_floor > 0:
            raise ValueError(f"--sigma-floor must be positive, got {self.sigma_floor}")
        if self.fit_mode not in ("weighted", "paper"):
            raise ValueError(f"--fit-mode must be weighted or paper, got {self.fit_mode!r}")
        if not 0 <= self.min_r2 <= 1:
            raise ValueError(f"--min-r2 must be in [0, 1], got {self.min_r2}")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ValueError(f"--granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"--threshold must be >= 0, got {self.threshold}")
        if self.from_param_json is not None:
            if self.key is None:
                raise ValueError("--from-param-json needs --key (--list-keys shows the file's keys)")
            if self.dataset is not None:
                raise ValueError("--from-param-json imports a published fit; it takes no --dataset")
            if self.reward_model is not None and not self.into_rm:
                raise ValueError("with --from-param-json, --reward-model is only used by --into-rm")
            if self.into_rm and self.reward_model is None:
                raise ValueError("--into-rm needs --reward-model")
            return
        if self.key is not None:
            raise ValueError("--key selects an entry of --from-param-json")
        if self.reward_model is None or self.dataset is None:
            raise ValueError(
                "fitting needs --reward-model and --dataset "
                "(or import a published fit with --from-param-json and --key)"
            )

    @property
    def imports(self) -> bool:
        return self.from_param_json is not None


@dataclass
class PPOConfig(PPOMemoryOptions):
    """`segppo ppo train`: PPO against dense segment (or token, or bandit) rewards."""

    policy: str = option(panel=MODEL, help="SFT model: the initial policy (and the default reference).")
    reward_model: str = option(panel=MODEL, help="Reward model folder (or run folder) or hub name.")
    prompts: str = option(
        panel=DATA, help="Prompt data: hub name, file or folder (strings or message lists)."
    )
    output: str = option(panel=RUN, help="Run folder (policy/, state/, metrics.jsonl, samples.jsonl).")
    reference: str | None = option(
        None, panel=MODEL, help="Frozen reference for KL and entropy (default: --policy)."
    )
    critic_init: str = option("rm", panel=MODEL, help="rm | sft: where the critic starts.")
    split: str = option("train", panel=DATA, help="Split of the prompt data.")
    max_samples: int | None = option(None, panel=DATA, help="Use at most this many prompts.")
    prompt_key: str | None = option(None, panel=DATA, help="Column of the prompt (overrides detection).")
    chat_template: str | None = option(
        None, panel=DATA, help="Jinja template (default: the one the RM was trained with)."
    )
    chat_template_kwargs: dict[str, Any] | None = option(
        None, panel=DATA, help=f"{CHAT_TEMPLATE_KWARGS_HELP} (default: the ones the RM was trained with)."
    )
    max_prompt_len: int = option(1024, panel=DATA, help="Prompt tokens (see --long-prompts).")
    long_prompts: str = option("error", panel=DATA, help="error | truncate: prompts over --max-prompt-len.")
    strict: bool = option(
        False, panel=DATA, help="A malformed prompt row is an error naming it (default: skip, count)."
    )
    max_new_tokens: int = option(1024, panel=GENERATION, help="Generation limit per response.")
    temperature: float = option(
        1.0, panel=GENERATION, help="Sampling temperature (log-probs and KL are taken at it)."
    )
    top_p: float = option(1.0, panel=GENERATION, help="Nucleus sampling mass.")
    stop_token: list[str] | None = option(None, panel=GENERATION, help="Extra stop token (repeatable).")
    reward_granularity: str | None = option(
        None, panel=SEGMENTS, help="segment | token | bandit (default: the RM's)."
    )
    entropy_threshold: float | None = option(
        None, panel=SEGMENTS, help="Segmentation threshold (default: the RM's)."
    )
    distribute: str = option(
        "interpolate", panel=SEGMENTS, help="interpolate | repeat | end: a segment's reward on its tokens."
    )
    normalizer: str | None = option(
        None, panel=SEGMENTS, help="normalizer.json (default: the RM's own, if any)."
    )
    normalize: bool = option(True, panel=SEGMENTS, help="Location-aware normalization of segment rewards.")
    reward_mean: float | None = option(None, panel=SEGMENTS, help="Bandit normalizer mean.")
    reward_std: float | None = option(None, panel=SEGMENTS, help="Bandit normalizer std.")
    sigma_floor: float | None = option(
        None, panel=SEGMENTS, help="Floor of σ(p) (default: the normalizer's own)."
    )
    reward_clip: float = option(10.0, panel=SEGMENTS, help="Clip each token's dense reward to ± this.")
    kl_coef: float = option(0.01, panel=PPO, help="β of the KL penalty (initial value when adaptive).")
    kl_target: float | None = option(
        None,
        panel=PPO,
        help="Adaptive KL control towards this per-token mean KL (as OpenRLHF and the paper).",
    )
    kl_horizon: int = option(10000, panel=PPO, help="Horizon of the adaptive KL controller.")
    kl_estimator: str = option("k1", panel=PPO, help="k1 | k3.")
    missing_eos_penalty: float | None = option(
        None, panel=SEGMENTS, help="Added at the last token without EOS."
    )
    overlong_penalty: float | None = option(
        None, panel=SEGMENTS, help="Added when a response exceeds --max-response-len."
    )
    max_response_len: int | None = option(
        None, panel=SEGMENTS, help="Responses longer than this get --overlong-penalty."
    )
    gamma: float = option(1.0, panel=PPO, help="GAE discount γ.")
    lam: float = option(0.95, panel=PPO, help="GAE λ.")
    policy_clip: float = option(0.2, panel=PPO, help="PPO ratio clip ε.")
    policy_clip_high: float | None = option(
        None,
        panel=PPO,
        help="ε_high of the ratio's upper clip 1 + ε_high (default --policy-clip; DAPO's clip-higher).",
    )
    dual_clip: float | None = option(
        None,
        panel=PPO,
        help="Dual clip C > 1: a token's policy loss where A < 0 is at most C·|A| (off by default).",
    )
    loss_agg: str = option(
        "token-mean",
        panel=PPO,
        help="token-mean: over all tokens of an optimizer step | seq-mean: per response, then over "
        "responses (the paper's code).",
    )
    value_clip: float | None = option(None, panel=PPO, help="Default 0.25 dense, 0.2 bandit.")
    whiten_advantages: bool = option(
        True,
        panel=PPO,
        help="Whiten advantages over the rollout batch (gae, rloo; reinforce++ always does, grpo never).",
    )
    advantage: str = option(
        "gae", panel=PPO, help="gae | rloo | grpo | reinforce++ (the last three need no critic)."
    )
    n_samples_per_prompt: int = option(
        1, panel=PPO, help="Responses per prompt, consecutive rows of one micro-rollout: rloo/grpo's group."
    )
    rollout_batch_size: int = option(
        1024,
        panel=PPO,
        help="Prompts per rollout over all ranks (× --n-samples-per-prompt responses, as OpenRLHF).",
    )
    micro_rollout_batch_size: int = option(
        16,
        panel=MEMORY,
        help="Responses per generate call on one rank (a multiple of --n-samples-per-prompt).",
    )
    rollout_engine: str = option(
        "hf", panel=GENERATION, help="hf | vllm: the generation engine of the rollouts."
    )
    train_batch_size: int = option(128, panel=PPO, help="Responses per optimizer step over all ranks.")
    micro_train_batch_size: int = option(4, panel=MEMORY, help="Responses per update forward on one rank.")
    ppo_epochs: int = option(1, panel=PPO, help="Update passes over each rollout batch.")
    num_episodes: int = option(1, panel=PPO, help="Passes over the prompt set.")
    max_steps: int | None = option(
        None,
        panel=OPTIMISATION,
        help="Rollout/update rounds to run; overrides --num-episodes (stops early, or continues into "
        "more episodes).",
    )
    actor_lr: float = option(5e-7, panel=OPTIMISATION, help="Peak learning rate of the policy.")
    critic_lr: float = option(9e-6, panel=OPTIMISATION, help="Peak learning rate of the critic.")
    warmup_ratio: float = option(
        0.03, panel=OPTIMISATION, help="Share of the steps spent warming the learning rates up."
    )
    min_lr_ratio: float = option(
        0.1, panel=OPTIMISATION, help="Cosine floor as a fraction of each peak learning rate."
    )
    weight_decay: float = option(0.0, panel=OPTIMISATION, help="AdamW weight decay.")
    grad_clip: float = option(1.0, panel=OPTIMISATION, help="Clip the gradient norm to this.")
    zero_stage: int = option(
        2, panel=MEMORY, help="DeepSpeed ZeRO stage 0-3 (one rank trains 1 and 2 as 0: nothing to partition)."
    )
    bf16: bool = option(False, panel=MEMORY, help="Train in bfloat16.")
    gradient_checkpointing: bool = option(
        False, panel=MEMORY, help="Recompute activations in the backward pass (less memory, slower)."
    )
    packing: bool = option(
        False,
        panel=MEMORY,
        help="Pack each update micro-batch's sequences into rows kept apart by the attention mask, "
        "one row under flash attention (same losses, fewer padding tokens).",
    )
    save_every: int = option(0, panel=RUN, help="Checkpoint every N steps (0: at the end only).")
    save_total_limit: int = option(
        2, panel=RUN, help="Training states kept in state/, newest first (0: all)."
    )
    num_logged_samples: int = option(4, panel=RUN, help="Generations per step written to samples.jsonl.")
    seed: int = option(42, panel=RUN, help="Seed of the prompt order, sampling and initialisation.")
    nproc: int = option(1, panel=MEMORY, help="Local ranks to run (DeepSpeed).")
    resume: bool = option(False, panel=RUN, help="Continue the run in --output from its last state.")
    trust_remote_code: bool = option(
        False, panel=MODEL, help="Allow model code from the hub (off by default)."
    )
    tensorboard: bool = option(False, panel=RUN, help="Also log to TensorBoard (output/tensorboard).")
    wandb_project: str | None = option(None, panel=RUN, help="Also log to this W&B project.")

    def __post_init__(self) -> None:
        check_not_nan(self)
        check_seed(self)
        check_positive(
            self,
            "max_prompt_len",
            "max_new_tokens",
            "rollout_batch_size",
            "micro_rollout_batch_size",
            "train_batch_size",
            "micro_train_batch_size",
            "ppo_epochs",
            "num_episodes",
            "nproc",
            "n_samples_per_prompt",
            "kl_horizon",
        )
        check_max_samples(self)
        parse_json_objects(self, "chat_template_kwargs")
        if self.reward_granularity is not None and self.reward_granularity not in GRANULARITIES:
            raise ValueError(
                f"--reward-granularity must be one of {GRANULARITIES}, got {self.reward_granularity!r}"
            )
        if self.entropy_threshold is not None and self.entropy_threshold < 0:
            raise ValueError(f"--entropy-threshold must be >= 0, got {self.entropy_threshold}")
        choices = {
            "critic_init": ("rm", "sft"),
            "kl_estimator": ("k1", "k3"),
            "distribute": ("interpolate", "repeat", "end"),
            "advantage": ESTIMATORS,
            "rollout_engine": ("hf", "vllm"),
            "long_prompts": ("error", "truncate"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if not self.temperature > 0:  # NaN too
            raise ValueError(
                f"--temperature must be positive, got {self.temperature}: PPO takes its log-probs, ratios "
                "and KL at the sampling temperature, and greedy decoding (0, as in `segppo eval`) has none"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.advantage in GROUP_ESTIMATORS and self.n_samples_per_prompt < 2:
            raise ValueError(
                f"--advantage {self.advantage} needs --n-samples-per-prompt >= 2 (a group to take the "
                f"baseline from), got {self.n_samples_per_prompt}"
            )
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        check_normalizer_options(self)
        for name in ("kl_coef", "reward_clip", "policy_clip", "actor_lr", "critic_lr"):
            if getattr(self, name) < 0 or (name != "kl_coef" and getattr(self, name) == 0):
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.kl_target is not None:
            # The controller divides by the target and scales β by a factor near 1 each step.
            if not self.kl_target > 0:
                raise ValueError(f"--kl-target must be positive, got {self.kl_target}")
            if not self.kl_coef > 0:
                raise ValueError(
                    f"--kl-target needs a positive --kl-coef (its starting β), got {self.kl_coef}: "
                    "the controller scales β, which from 0 never moves"
                )
        if self.policy_clip_high is not None and not self.policy_clip_high > 0:
            raise ValueError(f"--policy-clip-high must be positive, got {self.policy_clip_high}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"--dual-clip must be greater than 1, got {self.dual_clip}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"--loss-agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        if self.overlong_penalty is not None and self.max_response_len is None:
            raise ValueError("--overlong-penalty needs --max-response-len")
        if self.max_response_len is not None and self.overlong_penalty is None:
            raise ValueError("--max-response-len needs --overlong-penalty (the penalty it is the limit of)")
        if self.max_response_len is not None and self.max_response_len >= self.max_new_tokens:
            # A response has at most --max-new-tokens tokens: none would be longer.
            raise ValueError(
                f"--max-response-len {self.max_response_len} is not below --max-new-tokens "
                f"{self.max_new_tokens}: no response is longer, so --overlong-penalty would never apply"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1, got {self.max_steps}")
        check_schedule_options(self)
        self.check_memory_options()

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    @property
    def responses_per_rollout(self) -> int:
        """Responses (rows) per rollout: `rollout_batch_size` prompts × `n_samples_per_prompt`."""
        return self.rollout_batch_size * self.n_samples_per_prompt

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(responses per rank per rollout, gradient-accumulation steps) for `world_size` ranks."""
        n = self.n_samples_per_prompt
        # A prompt's n responses are consecutive rows of one micro-rollout, so a group never
        # straddles micro-batches or ranks (rloo/grpo take their baseline within one batch).
        if self.micro_rollout_batch_size % n:
            raise ValueError(
                f"--micro-rollout-batch-size {self.micro_rollout_batch_size} (responses) must be a "
                f"multiple of --n-samples-per-prompt {n}"
            )
        responses = self.responses_per_rollout
        what = f"--rollout-batch-size {self.rollout_batch_size}" + (f" × {n} samples" if n > 1 else "")
        if responses % (self.micro_rollout_batch_size * world_size):
            raise ValueError(
                f"{what} must be a multiple of "
                f"--micro-rollout-batch-size {self.micro_rollout_batch_size} × {world_size} rank(s)"
            )
        if responses % self.train_batch_size:
            raise ValueError(f"{what} must be a multiple of --train-batch-size {self.train_batch_size}")
        if self.train_batch_size % (self.micro_train_batch_size * world_size):
            raise ValueError(
                f"--train-batch-size {self.train_batch_size} must be a multiple of "
                f"--micro-train-batch-size {self.micro_train_batch_size} × {world_size} rank(s)"
            )
        return responses // world_size, self.train_batch_size // (self.micro_train_batch_size * world_size)


__all__ = [
    "DATA_KINDS",
    "DEMO_TASKS",
    "DataInspectConfig",
    "DemoConfig",
    "EvalConfig",
    "FIT_NORMALIZER_PRESETS",
    "FitNormalizerConfig",
    "MemoryOptions",
    "PPOConfig",
    "PPOMemoryOptions",
    "PPO_PRESETS",
    "PROMPT_SHARE",
    "RMConfig",
    "RMEvalConfig",
    "RM_PRESETS",
    "check_positive",
    "load_config_file",
    "normalize_keys",
    "option",
    "preset_values",
    "resolve_prompt_limit",
]
