"""Scoring responses with a reward model and its segmenter: one function for training, eval,
normalizer fitting and PPO, so all of them read the reward model the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from segppo.data import ChatFormat, EncodedPair, LayoutOptions, ResponseBatch, SkipReport, encode_preferences
from segppo.io import as_recorded
from segppo.kernels import sequence_scores
from segppo.models import SegppoMetadata, load_policy, load_reward_model, load_tokenizer
from segppo.models.reward_model import reward_values, run_model_folder
from segppo.normalizer import DEFAULT_SIGMA_FLOOR, Normalizer
from segppo.segments import Segmentation, segmenter_entropy


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
    # The model `segmenter` was loaded from (`--segmenter`, else the recorded one); None without one.
    segmenter_name: str | None = None

    def encode_pairs(self, rows, cfg) -> tuple[list[EncodedPair], SkipReport]:
        """Preference `rows` as this reward model was trained on them (its tokenizer, chat template
        and template variables), with `cfg`'s column keys and length limits (rm eval, fit-normalizer)."""
        return encode_preferences(
            rows,
            self.tokenizer,
            layout_options=LayoutOptions(
                prompt_key=cfg.prompt_key, chosen_key=cfg.chosen_key, rejected_key=cfg.rejected_key
            ),
            max_len=cfg.max_len,
            max_prompt_len=cfg.max_prompt_len,
            chat_template=self.chat.template,
            template_kwargs=self.chat.template_kwargs,
        )

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
    segmenter_model, name = None, None
    if segmentation.needs_entropy:
        name = segmenter or metadata.segmenter
        if not name:
            raise ValueError(
                f"{path}: a segment-level reward model needs its segmenter, but segppo.json records none; "
                "pass --segmenter"
            )
        if segmenter is None and Path(name).is_absolute() and not Path(name).is_dir():
            raise FileNotFoundError(
                f"{path}: its segppo.json records the segmenter {name}, which is not a folder here "
                "(moved or deleted); pass --segmenter with the model it was segmented with"
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
        segmenter_name=as_recorded(name) if name else None,
    )


def encode_for_reward_model(
    chat: ChatFormat, messages: list[dict], text: str, has_eos: bool, max_prompt_len: int | None = None
) -> tuple[list[int], list[int], bool]:
    """(prompt ids, response ids, has_eos) of a response *text* as a reward model with its own
    tokenizer reads it: formatted with the RM's chat format; a response that never reached its stop
    token is scored without the end of turn; a prompt over `max_prompt_len` tokens loses content from
    its oldest turns, never the template's tokens (`ChatFormat.truncate_prompt`)."""
    messages, prompt_ids, _ = chat.truncate_prompt(messages, max_prompt_len)
    response_ids, rm_has_eos = chat.response_ids(messages, text, prompt_ids=prompt_ids)
    if not has_eos and rm_has_eos:  # a cut-off generation is scored without its end of turn
        response_ids, rm_has_eos = response_ids[:-1], False
    if not response_ids:  # nothing left to score: keep the end-of-turn token
        response_ids, rm_has_eos = [chat.end_of_turn_id], True
    return prompt_ids, response_ids, rm_has_eos


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map the same strings to the same ids (token ids can be shared)."""
    return a is b or a.get_vocab() == b.get_vocab()


@dataclass
class NormalizerChoice:
    """Which location-aware normalizer turns a reward model's segment scores into rewards."""

    params: tuple[float, float, float, float] | None  # [a, b, c, d]; None: raw segment rewards
    sigma_floor: float
    source: str | None  # where the params came from (None when there are none)


def resolve_normalizer(
    metadata: SegppoMetadata,
    segmentation: Segmentation,
    *,
    normalize: bool = True,
    normalizer: str | None = None,
    reward_mean: float | None = None,
    reward_std: float | None = None,
    sigma_floor: float | None = None,
) -> NormalizerChoice:
    """The normalizer PPO and eval use, in this order: none (`--no-normalize`), `--normalizer FILE`,
    `--reward-mean/--reward-std`, what the RM records (its normalizer, else a bandit RM's global
    score mean/std), else none. `--sigma-floor` overrides the chosen normalizer's own floor.
    `segmentation` is how the run cuts responses (the RM's, or PPO's --reward-granularity and
    --entropy-threshold): a normalizer file fitted on other segments is refused."""
    granularity = segmentation.granularity

    def floor(own: float = DEFAULT_SIGMA_FLOOR) -> float:
        return sigma_floor if sigma_floor is not None else float(own)

    if not normalize:
        return NormalizerChoice(None, floor(), None)
    if normalizer:
        fitted = Normalizer.load(normalizer)
        if not fitted.fits(granularity, segmentation.threshold):  # as `fit-normalizer --into-rm` refuses it
            raise ValueError(
                f"--normalizer {normalizer} is fitted for {fitted.granularity} rewards (threshold "
                f"{fitted.threshold}), but the run gives {granularity} rewards (threshold "
                f"{segmentation.threshold}): it would scale rewards of other segments than it was fitted on"
            )
        return NormalizerChoice(fitted.as_kernel_params(), floor(fitted.sigma_floor), str(normalizer))
    if reward_mean is not None or reward_std is not None:
        if reward_mean is None or reward_std is None:
            raise ValueError("--reward-mean and --reward-std go together")
        return NormalizerChoice((0.0, 0.0, reward_mean, reward_std), floor(), "--reward-mean/--reward-std")
    recorded = metadata.normalizer or {}
    if recorded.get("params"):
        params = tuple(float(x) for x in recorded["params"])
        return NormalizerChoice(
            params, floor(recorded.get("sigma_floor") or DEFAULT_SIGMA_FLOOR), "segppo.json"
        )
    if granularity == "bandit" and metadata.score_mean is not None and metadata.score_std:
        params = (0.0, 0.0, float(metadata.score_mean), float(metadata.score_std))
        return NormalizerChoice(params, floor(), "segppo.json score_mean/std")
    return NormalizerChoice(None, floor(), None)
