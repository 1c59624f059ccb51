"""Scoring responses with a reward model and its segmenter: one function for training, eval,
normalizer fitting and PPO, so all of them read the reward model the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from segppo.data import ChatFormat, ResponseBatch
from segppo.kernels import resolve_granularity, sequence_scores
from segppo.models import SegppoMetadata, load_policy, load_reward_model, load_tokenizer
from segppo.models.reward_model import reward_values, run_model_folder
from segppo.segments import segmenter_entropy


@dataclass
class Segmentation:
    """How a reward model's responses are cut into segments."""

    granularity: str  # segment | token | bandit (the paper's sentinel thresholds are resolved)
    threshold: float

    @classmethod
    def resolve(cls, granularity: str, threshold: float) -> Segmentation:
        return cls(resolve_granularity(granularity, threshold), float(threshold))

    @property
    def needs_entropy(self) -> bool:
        return self.granularity == "segment"


@dataclass
class ScoredResponses:
    scores: torch.Tensor  # [N] float32, mean RM value at segment ends
    rm_values: torch.Tensor  # [N, T] float32, the RM's per-token values on the response
    entropy: torch.Tensor  # [N, T] float32 (zeros when the granularity needs none)


def response_entropy(segmenter, batch: ResponseBatch, segmentation: Segmentation) -> torch.Tensor:
    """The segmenter's entropy on response positions; token and bandit RMs need no segmenter."""
    if not segmentation.needs_entropy:
        return torch.zeros(batch.response_mask.shape, device=batch.input_ids.device)
    if segmenter is None:
        raise ValueError("a segment-level reward model needs a segmenter to compute entropy")
    return segmenter_entropy(
        segmenter, batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len
    )


def score_responses(
    reward_model, segmenter, batch: ResponseBatch, segmentation: Segmentation
) -> ScoredResponses:
    """Score every row of `batch`; differentiable w.r.t. the reward model when grad is enabled."""
    entropy = response_entropy(segmenter, batch, segmentation)
    values = reward_values(reward_model, batch.input_ids, batch.attention_mask, batch.position_ids)
    rm_values = values[:, batch.prompt_len :]
    scores = sequence_scores(
        rm_values,
        entropy,
        batch.response_mask,
        granularity=segmentation.granularity,
        threshold=segmentation.threshold,
        has_eos=batch.has_eos,
    )
    return ScoredResponses(scores, rm_values, entropy)


@dataclass
class RewardScorer:
    """A frozen reward model with everything needed to read it as it was trained."""

    model: torch.nn.Module
    segmenter: torch.nn.Module | None
    tokenizer: object
    chat: ChatFormat
    metadata: SegppoMetadata
    segmentation: Segmentation
    device: torch.device

    def score(self, batch: ResponseBatch) -> ScoredResponses:
        with torch.no_grad():
            return score_responses(self.model, self.segmenter, batch.to(self.device), self.segmentation)


def load_scorer(
    path: str,
    *,
    device: torch.device | str | None = None,
    dtype: str | None = None,
    segmenter: str | None = None,
    granularity: str | None = None,
    threshold: float | None = None,
    trust_remote_code: bool = False,
) -> RewardScorer:
    """Load a reward model, its tokenizer, chat format and segmenter from the RM folder's metadata.

    `segmenter`, `granularity` and `threshold` override what `segppo.json` records (needed for
    imported models that record no granularity).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, metadata = load_reward_model(
        path, dtype=dtype, trust_remote_code=trust_remote_code, granularity=granularity, threshold=threshold
    )
    folder = run_model_folder(Path(path)) if Path(path).is_dir() else path
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    segmentation = Segmentation.resolve(metadata.granularity, metadata.threshold or 0.0)
    segmenter_model = None
    if segmentation.needs_entropy:
        name = segmenter or metadata.segmenter
        if not name:
            raise ValueError(
                f"{path}: a segment-level reward model needs its segmenter, but segppo.json records none; "
                "pass --segmenter"
            )
        segmenter_model = load_policy(name, dtype=dtype, trust_remote_code=trust_remote_code)
        segmenter_model.requires_grad_(False)
        segmenter_model = segmenter_model.eval().to(device)
    model.requires_grad_(False)
    return RewardScorer(
        model=model.eval().to(device),
        segmenter=segmenter_model,
        tokenizer=tokenizer,
        chat=ChatFormat.from_metadata(tokenizer, metadata),  # the recorded template and stop ids
        metadata=metadata,
        segmentation=segmentation,
        device=device,
    )
