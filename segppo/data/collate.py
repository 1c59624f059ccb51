"""Collation into response-aligned batches (DESIGN §2).

Prompts are left-padded and responses right-padded so that every row's response starts at the
same column `P = prompt_len`:

    input_ids       [B, P+T]   pad..pad prompt | response pad..pad
    attention_mask  [B, P+T]   1 on real tokens
    position_ids    [B, P+T]   cumsum(attention_mask) - 1, clamped at 0: left padding shifts nothing
    response_mask   [B, T]     bool, true for t < L_b (the response length, EOS included)
    has_eos         [B]        bool, the last response token is a stop token

Under this layout response token `t` sits at column `P+t`, so with a causal model:

- the logits at column `P+t` are the next-token distribution *at* response position `t` (over
  token `t+1`): `entropy[:, t]` comes from `logits[:, P+t]`, i.e. `logits[:, P:P+T]`;
- the log-prob of response token `t` comes from the logits one column earlier, `logits[:, P-1:P+T-1]`;
- the reward model's per-token value at column `P+t` is `rm_values[:, t]`, i.e. `values[:, P:P+T]`.

A preference batch of B pairs is one batch of 2B rows, chosen first (rows `:B`) then rejected
(rows `B:`), sharing one `P` and `T` so that a single forward scores both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .chat import EncodedPair


def pair_tokens(pair: EncodedPair) -> int:
    """Real tokens a pair puts through a model (its prompt before each response, both responses):
    what progress counts for tokens/s."""
    return 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


@dataclass
class PromptBatch:
    """Left-padded prompts for generation."""

    input_ids: torch.Tensor  # [B, P] long
    attention_mask: torch.Tensor  # [B, P] long
    position_ids: torch.Tensor  # [B, P] long

    def to(self, device: torch.device | str) -> PromptBatch:
        return _to(self, device)


@dataclass
class ResponseBatch:
    """Prompt + response rows aligned so that every response starts at column `prompt_len`."""

    input_ids: torch.Tensor  # [B, P+T] long
    attention_mask: torch.Tensor  # [B, P+T] long
    position_ids: torch.Tensor  # [B, P+T] long
    prompt_len: int  # P
    response_mask: torch.Tensor  # [B, T] bool
    has_eos: torch.Tensor  # [B] bool

    @property
    def response_ids(self) -> torch.Tensor:
        """[B, T] the response columns of input_ids (padding where response_mask is false)."""
        return self.input_ids[:, self.prompt_len :]

    def prompt_ids(self, row: int) -> list[int]:
        """Row `row`'s prompt token ids, without the left padding."""
        real = self.attention_mask[row, : self.prompt_len].bool()
        return self.input_ids[row, : self.prompt_len][real].tolist()

    def to(self, device: torch.device | str) -> ResponseBatch:
        return _to(self, device)


@dataclass
class PreferenceBatch(ResponseBatch):
    """2B rows: the chosen responses of B pairs, then their rejected responses."""

    margin: torch.Tensor  # [B] float, 0 where a pair has no margin

    @property
    def num_pairs(self) -> int:
        return self.margin.shape[0]


def _to(batch, device):
    tensors = {k: v.to(device) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    return dataclasses.replace(batch, **tensors)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def collate_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int) -> PromptBatch:
    """Left-pad prompt ids into one batch for generation."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
    return PromptBatch(input_ids, attention_mask, _positions(attention_mask))


def collate_responses(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    has_eos: Sequence[bool],
    pad_token_id: int,
) -> ResponseBatch:
    """Left-pad prompts and right-pad responses so that every response starts at column P."""
    if not (len(prompts) == len(responses) == len(has_eos)) or not prompts:
        raise ValueError(
            f"need as many prompts, responses and has_eos, at least one: "
            f"{len(prompts)}, {len(responses)}, {len(has_eos)}"
        )
    batch = len(prompts)
    prompt_len = max(len(p) for p in prompts)
    response_len = max(len(r) for r in responses)
    input_ids = torch.full((batch, prompt_len + response_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, prompt_len + response_len), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        start, end = prompt_len - len(prompt), prompt_len + len(response)
        input_ids[row, start:end] = torch.as_tensor([*prompt, *response], dtype=torch.long)
        attention_mask[row, start:end] = 1

    lengths = torch.as_tensor([len(r) for r in responses])
    response_mask = torch.arange(response_len)[None, :] < lengths[:, None]
    return ResponseBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_positions(attention_mask),
        prompt_len=prompt_len,
        response_mask=response_mask,
        has_eos=torch.as_tensor(list(has_eos), dtype=torch.bool),
    )


def collate_preferences(pairs: Sequence[EncodedPair], pad_token_id: int) -> PreferenceBatch:
    """B pairs -> one batch of 2B rows (chosen rows first, then rejected) with a [B] margin."""
    responses = collate_responses(
        prompts=[p.prompt_ids for p in pairs] * 2,
        responses=[p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
        has_eos=[p.chosen_has_eos for p in pairs] + [p.rejected_has_eos for p in pairs],
        pad_token_id=pad_token_id,
    )
    margin = torch.tensor([0.0 if p.margin is None else p.margin for p in pairs], dtype=torch.float32)
    return PreferenceBatch(**vars(responses), margin=margin)
