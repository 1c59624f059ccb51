"""Glue from models to kernels: how responses are segmented, entropy from the segmenter, log-probs.

Every batch has the layout of `segppo.data`: left-padded prompts and right-padded responses, so all
rows' responses start at column `P = prompt_len` of `input_ids [B, P+T]`. Column `P+t` holds
response token `t`; the logits there are the next-token distribution of response position `t`
(the segmenter's entropy at `t`), and the logits at `P+t-1` score token `t` itself.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from segppo.kernels import entropy_logprobs, resolve_granularity


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


def _accepts(model: torch.nn.Module, name: str) -> bool:
    forward = getattr(model, "module", model).forward  # unwrap a DeepSpeed engine
    return name in inspect.signature(forward).parameters


def last_logits(model, input_ids, attention_mask, position_ids, keep: int) -> torch.Tensor:
    """Logits of the last `keep` columns, `[B, keep, V]` in the model's dtype.

    Only those columns go through the LM head (`logits_to_keep`), so the prompt never costs a
    logits-sized buffer.
    """
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if position_ids is not None and _accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids
    if not _accepts(model, "logits_to_keep"):
        return model(**kwargs).logits[:, -keep:]
    kwargs["logits_to_keep"] = keep
    # The kept hidden states are a strided slice; a plain matmul over it falls back to a batched
    # product that holds a second logits-sized buffer (bf16 on CPU). A contiguous input avoids that.
    head = getattr(model, "module", model).get_output_embeddings()
    hook = head.register_forward_pre_hook(_contiguous_first_input) if head is not None else None
    try:
        logits = model(**kwargs).logits
    finally:
        if hook is not None:
            hook.remove()
    return logits[:, -keep:]  # models that ignore logits_to_keep=S still return S columns


def _contiguous_first_input(module, args):
    return (args[0].contiguous(), *args[1:])


@torch.no_grad()
def segmenter_entropy(segmenter, input_ids, attention_mask, position_ids, prompt_len: int) -> torch.Tensor:
    """Entropy `[B, T]` float32 of the segmenter's next-token distribution at each response position."""
    response_len = input_ids.shape[1] - prompt_len
    if response_len == 0:
        return torch.zeros(input_ids.shape[0], 0, device=input_ids.device)
    logits = last_logits(segmenter, input_ids, attention_mask, position_ids, response_len)
    entropy, _ = entropy_logprobs(logits)
    return entropy


def logprobs_and_entropy(
    model, input_ids, attention_mask, position_ids, prompt_len: int, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens and the entropy at each response position, `[B, T]` float32.

    One `entropy_logprobs` pass over the `T+1` logit columns `P-1 .. P+T-1`: column `P-1+j` scores
    token `j`, column `P+t` is position `t`'s next-token distribution.
    """
    response_len = input_ids.shape[1] - prompt_len
    if prompt_len < 1:
        raise ValueError("a response needs at least one prompt token before it")
    logits = last_logits(model, input_ids, attention_mask, position_ids, response_len + 1)
    targets = torch.nn.functional.pad(input_ids[:, prompt_len:], (0, 1), value=0)
    entropy, logprobs = entropy_logprobs(logits, targets, temperature=temperature)
    return logprobs[:, :-1], entropy[:, 1:]
