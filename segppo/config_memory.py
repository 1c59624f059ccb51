"""The memory options of `rm train` and `ppo train` (LoRA, ZeRO offload), as config mixins.

Their fields are keyword-only, so the commands' own fields keep their order and positions;
`segppo.config` re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass

from segppo.config_fields import (
    MEMORY,
    option,
)

LORA_EXPORTS = ("merged", "adapter")


@dataclass(kw_only=True)
class MemoryOptions:
    """LoRA through peft, and CPU offload of the trained models' optimizer states."""

    lora_rank: int = option(
        0,
        panel=MEMORY,
        help="LoRA rank of the adapters (0: train every weight); a per-token head is trained whole.",
    )
    lora_alpha: float = option(
        16.0, panel=MEMORY, help="LoRA scale: the adapters' update is scaled by alpha/rank."
    )
    lora_targets: str = option(
        "all-linear", panel=MEMORY, help="Modules to adapt: comma-separated names or suffixes, or all-linear."
    )
    lora_export: str = option(
        "merged",
        panel=MEMORY,
        help="merged: base + adapters, a stock transformers folder | adapter: the adapter alone.",
    )
    offload_optimizer: bool = option(
        False,
        panel=MEMORY,
        help="Keep optimizer states and fp32 master weights in CPU memory (ZeRO stage 1-3).",
    )

    def check_memory_options(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"--zero-stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise ValueError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not self.lora_targets.strip(" ,"):
            raise ValueError("--lora-targets is empty; name modules (q_proj,v_proj) or pass all-linear")
        if self.lora_export not in LORA_EXPORTS:
            raise ValueError(f"--lora-export must be one of {LORA_EXPORTS}, got {self.lora_export!r}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("--offload-optimizer needs ZeRO (--zero-stage 1, 2 or 3)")


@dataclass(kw_only=True)
class PPOMemoryOptions(MemoryOptions):
    """PPO's: also ZeRO-3 parameter offload of the frozen reference and reward model."""

    ref_offload: bool = option(
        False, panel=MEMORY, help="ZeRO-3: keep the frozen reference's parameters in CPU memory between uses."
    )
    rm_offload: bool = option(
        False,
        panel=MEMORY,
        help="ZeRO-3: keep the frozen reward model's parameters in CPU memory between uses.",
    )

    def check_memory_options(self) -> None:
        super().check_memory_options()
        for name in ("ref_offload", "rm_offload"):
            if getattr(self, name) and self.zero_stage != 3:
                raise ValueError(
                    f"--{name.replace('_', '-')} offloads ZeRO-3 partitions; it needs --zero-stage 3"
                )
        if self.lora_rank and self.ref_offload and self.reference is None:
            raise ValueError(
                "--ref-offload: with LoRA the reference is the actor's base model, not a separate model "
                "to offload (pass --reference to load a separate one)"
            )
        if self.lora_rank and self.rollout_engine == "vllm":
            raise ValueError(
                "--lora-rank does not work with --rollout-engine vllm yet; use --rollout-engine hf"
            )
