"""How much work `segppo demo` does: `small` for CI, `default` for the README's first command."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sft import SFTSettings


@dataclass(frozen=True)
class DemoBudget:
    """Sizes and settings of every stage of the demo, in pipeline order; defaults are the `default`
    budget's. The SFT settings are part of the policy's cache key.
    """

    name: str
    sft: SFTSettings = field(default_factory=SFTSettings)
    # RM training pairs on train-split prompts. Sampling is cheap (about 1.2 ms a pair on 2 cores)
    # and the tiny RM overfits a few thousand pairs: fresh pairs beat extra epochs.
    preference_pairs: int = 32768
    eval_preference_pairs: int = 512  # RM held-out accuracy pairs, on held-out prompts
    ppo_prompts: int = 4096  # train-split prompts written for PPO
    heldout_prompts: int = 512  # evaluation prompts; never used for SFT, RM or PPO training
    max_new_tokens: int = 40  # the demonstrator's responses have at most 30 words
    temperature: float = 1.0  # sampling of the preference responses (and of the SFT measurement)
    label_temperature: float = 0.5  # Bradley-Terry noise: P(a > b) = sigmoid((g_a - g_b) / T)
    generate_batch_size: int = 512
    # Reward model, normalizer, PPO and eval (`segppo.demo.pipeline` builds their configs).
    entropy_threshold: float = 1.0  # the SFT policy's entropy spikes where a new phrase starts
    max_len: int = 96
    max_prompt_len: int = 40
    rm_lr: float = 3e-3
    # The model the reward models start from: None for the SFT policy itself, else the settings of a
    # model trained like the SFT policy (same task, tokenizer and data, cached the same way) that
    # only the RMs start from; the SFT policy stays the policy, the reference and the segmenter.
    rm_backbone: SFTSettings | None = None
    rm_batch_size: int = 32
    rm_epochs: int = 1
    normalizer_pairs: int = 512
    # `--compare`: every granularity's RM gets the same epochs, with held-out accuracy measured
    # `rm_evals_per_epoch` times an epoch, so the table can say whether each one had levelled off
    # (measured on the animals task: one epoch leaves the bandit and segment RMs still climbing).
    compare_rm_epochs: int = 2
    rm_evals_per_epoch: int = 2
    credit_responses: int = 256  # held-out preference responses for the RM's local credit
    # PPO settings measured on the task: a larger actor lr games the RM (repeated phrases) and gold falls.
    ppo_steps: int = 48
    ppo_rollout_batch_size: int = 256
    ppo_train_batch_size: int = 64
    ppo_epochs: int = 1
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    kl_coef: float = 0.02

    def __post_init__(self) -> None:
        for name in ("preference_pairs", "eval_preference_pairs", "ppo_prompts", "heldout_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.heldout_prompts < 256:
            raise ValueError(f"heldout_prompts must be at least 256, got {self.heldout_prompts}")
        if self.label_temperature <= 0 or self.temperature <= 0:
            raise ValueError("temperatures must be positive")

    @classmethod
    def small(cls) -> DemoBudget:
        """For CI: the whole demo in about a minute and a half (SFT trained from scratch included)."""
        return cls(
            name="small",
            sft=SFTSettings(pretrain_steps=200, sft_steps=150),
            preference_pairs=4096,
            eval_preference_pairs=256,
            ppo_prompts=1024,
            heldout_prompts=256,
            normalizer_pairs=256,
            compare_rm_epochs=1,
            credit_responses=128,
            ppo_steps=12,
            ppo_rollout_batch_size=64,
            ppo_train_batch_size=32,
            actor_lr=2e-4,
            kl_coef=0.01,
        )

    @classmethod
    def default(cls) -> DemoBudget:
        """The README's demo: at most 5 minutes on 2 CPU cores, SFT policy included on a first run."""
        return cls(name="default")

    @classmethod
    def pairs(cls) -> DemoBudget:
        """`--compare ... --task pairs` (issue 24): RMs that learn the task. Telling `the red fox` from
        `the blue fox` means looking `red` up in the prompt; the SFT policy never learns that lookup
        (its demonstrations mostly follow the prompt's order), so the RMs start from a model of the
        same size trained on demonstrations always in a random order, long enough to leave the
        plateau before the lookup forms (after about 4000 steps). Twice the default's pairs, 4 epochs
        at a lower RM lr (the bandit RM is the slowest: 0.65 held-out after 2 epochs, 0.72 after 4);
        every other stage is the default's (benchmarks/RESULTS.md, the RM learning curve).
        """
        return cls(
            name="pairs",
            preference_pairs=65536,
            rm_lr=1e-3,
            rm_epochs=4,
            compare_rm_epochs=4,
            rm_backbone=SFTSettings(pretrain_steps=12000, sft_steps=0, lr=3e-3, pretrain_p_shuffle=1.0),
        )


BUDGETS = {"small": DemoBudget.small, "default": DemoBudget.default, "pairs": DemoBudget.pairs}


def get_budget(name: str | DemoBudget) -> DemoBudget:
    """The budget called `name` (a DemoBudget is returned as it is)."""
    if isinstance(name, DemoBudget):
        return name
    if name not in BUDGETS:
        raise ValueError(f"unknown demo budget {name!r}; one of {sorted(BUDGETS)}")
    return BUDGETS[name]()
