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
from segppo.kernels.linear_entropy import linear_entropy_logprobs
from segppo.models.shared_prefix import forward_logits

# Model types whose causal-LM forward is `logits = lm_head(last_hidden_state[:, kept])` and nothing
# more (read in transformers' modeling files). Others (Gemma-2's softcapping, Cohere's logit_scale,
# Granite's logits_scaling, remote code) keep the logits path. Gemma-3 softcaps only when its config
# sets `final_logit_softcapping` (the hub's checkpoints do not), which `_LOGIT_TRANSFORMS` checks.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "qwen3_moe",
        "gpt2",
        "gpt_neox",
        "phi",
        "phi3",
        "gemma",
        "gemma3_text",
        "olmo2",
        "smollm3",
    }
)
# Config fields that change the logits after the head: a model that sets one keeps the logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


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
        return forward_logits(model, kwargs, keep)[:, -keep:]
    kwargs["logits_to_keep"] = keep
    # The kept hidden states are a strided slice; a plain matmul over it falls back to a batched
    # product that holds a second logits-sized buffer (bf16 on CPU). A contiguous input avoids that.
    head = getattr(model, "module", model).get_output_embeddings()
    hook = head.register_forward_pre_hook(_contiguous_first_input) if head is not None else None
    try:
        logits = forward_logits(model, kwargs, keep)
    finally:
        if hook is not None:
            hook.remove()
    return logits[:, -keep:]  # models that ignore logits_to_keep=S still return S columns


def _contiguous_first_input(module, args):
    return (args[0].contiguous(), *args[1:])


def plain_linear_head(model) -> torch.nn.Linear | None:
    """The model's output layer when its logits are exactly `head(hidden)` with a plain
    `torch.nn.Linear` head (tied or not), else None (the logits path is used).

    Under ZeRO-3 the head's weight is partitioned outside its own forward, so such a model keeps
    the logits path too.
    """
    inner = getattr(model, "module", model)  # a DeepSpeed engine's model
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or hasattr(head.weight, "ds_id"):
        return None
    return head


def _returns_its_input(hidden, *args, **kwargs):
    return hidden


def last_hidden(model, head, input_ids, attention_mask, position_ids, keep: int) -> torch.Tensor:
    """The inputs of `head` at the last `keep` columns, `[B, keep, H]`: the model runs as usual
    (a DeepSpeed engine's forward and hooks included) with the head passing its input through, so
    what comes back is exactly what the head would have multiplied (after the final norm)."""
    head.forward = _returns_its_input  # an instance attribute: shadows nn.Linear.forward
    try:
        hidden = last_logits(model, input_ids, attention_mask, position_ids, keep)
    finally:
        del head.forward
    return hidden


# Where the fused head pays. It never holds the [N, V] logits, at the price of time: its backward
# computes each chunk's logits again (four products against the plain path's three) and the chunk
# loop costs more. On an accelerator memory is what limits the batch, so a plain linear head is
# always fused there. On CPU the logits are host memory, small next to the weights and Adam states
# of the model that makes them, and the plain path was 1.2-1.4x faster for the head
# (benchmarks/RESULTS.md, issues 13 and 22); it is fused only once a call's float32 logits would
# reach this size.
CPU_FUSED_HEAD_MIN_LOGITS_BYTES = 512 * 2**20


def fuses_head(n_tokens: int, vocab_size: int, device: torch.device) -> bool:
    """Whether `head_entropy_logprobs` takes a plain linear head's fused path for `n_tokens` rows."""
    if device.type != "cpu":
        return True
    return n_tokens * vocab_size * 4 >= CPU_FUSED_HEAD_MIN_LOGITS_BYTES


@dataclass
class HeadInput:
    """What one forward pass hands the entropy/log-prob head: the logits `[B, keep, V]`, or on the
    fused path the hidden states `[B·keep, H]` and the head itself. Several heads' worth of outputs
    (another temperature) can be read from one pass."""

    features: torch.Tensor
    head: torch.nn.Linear | None  # None: `features` are the logits
    rows: int  # B
    keep: int

    def entropy_logprobs(
        self, targets=None, *, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.head is None:
            return entropy_logprobs(self.features, targets, temperature=temperature)
        flat_targets = targets.reshape(-1) if targets is not None else None
        entropy, logprobs = linear_entropy_logprobs(
            self.features, self.head.weight, flat_targets, temperature=temperature, bias=self.head.bias
        )
        shape = (self.rows, self.keep)
        return entropy.view(shape), logprobs.view(shape) if logprobs is not None else None


def head_input(model, input_ids, attention_mask, position_ids, keep: int) -> HeadInput:
    """The forward pass for the last `keep` columns. A plain linear head (`plain_linear_head`) goes
    the fused way (`linear_entropy_logprobs`: the `[B, keep, V]` logits never exist) where
    `fuses_head` says so; any other head, and a small call on CPU, through the logits."""
    head = plain_linear_head(model)
    if head is not None and not fuses_head(input_ids.shape[0] * keep, head.out_features, head.weight.device):
        head = None
    if head is None:
        logits = last_logits(model, input_ids, attention_mask, position_ids, keep)
        return HeadInput(logits, None, input_ids.shape[0], keep)
    hidden = last_hidden(model, head, input_ids, attention_mask, position_ids, keep)
    B, H = hidden.shape[0], hidden.shape[-1]
    return HeadInput(hidden.reshape(B * keep, H).to(head.weight.dtype), head, B, keep)


def head_entropy_logprobs(
    model, input_ids, attention_mask, position_ids, keep: int, targets=None, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entropy and log-probs of `targets` `[B, keep]` (float32) of the next-token distributions at
    the last `keep` columns (`head_input`'s path). Differentiable, and equal to float32 rounding
    whichever path."""
    inputs = head_input(model, input_ids, attention_mask, position_ids, keep)
    return inputs.entropy_logprobs(targets, temperature=temperature)


@torch.no_grad()
def segmenter_entropy(segmenter, input_ids, attention_mask, position_ids, prompt_len: int) -> torch.Tensor:
    """Entropy `[B, T]` float32 of the segmenter's next-token distribution at each response position."""
    response_len = input_ids.shape[1] - prompt_len
    if response_len == 0:
        return torch.zeros(input_ids.shape[0], 0, device=input_ids.device)
    entropy, _ = head_entropy_logprobs(segmenter, input_ids, attention_mask, position_ids, response_len)
    return entropy


def logprobs_and_entropy(
    model, input_ids, attention_mask, position_ids, prompt_len: int, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens and the entropy at each response position, `[B, T]` float32.

    One `head_entropy_logprobs` pass over the `T+1` columns `P-1 .. P+T-1`: column `P-1+j` scores
    token `j`, column `P+t` is position `t`'s next-token distribution.
    """
    logprobs, entropy = response_logprobs_and_entropy(
        model, input_ids, attention_mask, position_ids, prompt_len, temperature=temperature
    )
    return logprobs[:, :-1], entropy[:, 1:]


def response_logprobs_and_entropy(
    model, input_ids, attention_mask, position_ids, prompt_len: int, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy `[B, T+1]` at the columns `P-1 .. P+T-1` (the last log-prob scores a
    pad 0): what `logprobs_and_entropy` and the rollout's sampling entropy slice."""
    response_len = input_ids.shape[1] - prompt_len
    if prompt_len < 1:
        raise ValueError("a response needs at least one prompt token before it")
    targets = torch.nn.functional.pad(input_ids[:, prompt_len:], (0, 1), value=0)
    entropy, logprobs = head_entropy_logprobs(
        model, input_ids, attention_mask, position_ids, response_len + 1, targets, temperature=temperature
    )
    return logprobs, entropy


@torch.no_grad()
def reference_logprobs_and_entropy(
    reference, input_ids, attention_mask, position_ids, prompt_len: int, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's log-probs at `temperature` (`logprobs_and_entropy`'s) and its segmentation
    entropy at temperature 1 (`segmenter_entropy`'s), `[B, T]` each, from one forward pass."""
    if prompt_len < 1:
        raise ValueError("a response needs at least one prompt token before it")
    keep = input_ids.shape[1] - prompt_len + 1
    targets = torch.nn.functional.pad(input_ids[:, prompt_len:], (0, 1), value=0)
    inputs = head_input(reference, input_ids, attention_mask, position_ids, keep)
    entropy, logprobs = inputs.entropy_logprobs(targets, temperature=temperature)
    if temperature != 1.0:
        entropy, _ = inputs.entropy_logprobs(temperature=1.0)
    return logprobs[:, :-1], entropy[:, 1:]
