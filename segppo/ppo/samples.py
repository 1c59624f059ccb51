"""A rollout's samples regrouped into training micro-batches, and a few logged to samples.jsonl.

The rollout's micro-batches have their own prompt and response widths. `RolloutPool` pads them
once into one `[N, P+T]` pool (prompts left-padded to the widest prompt, responses right-padded to
the longest response); a training micro-batch is then a row selection and a column window of the
pool, the same layout `collate_responses` gives those rows, all on the device. The only host
values are the rows' lengths, read once per rollout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from segppo.data import ResponseBatch, segment_texts
from segppo.ppo.rollout import Experience

TRAINING_TENSORS = ("logprobs", "values", "advantages", "returns")


def _pad_columns(x: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(x, (left, right), value=value)


@dataclass
class RolloutPool:
    input_ids: torch.Tensor  # [N, P+T]
    attention_mask: torch.Tensor  # [N, P+T]
    response_mask: torch.Tensor  # [N, T]
    has_eos: torch.Tensor  # [N]
    tensors: dict[str, torch.Tensor]  # TRAINING_TENSORS (or the names asked), [N, T], 0 past the response
    prompt_len: int  # P
    prompt_lengths: list[int]  # per row, without padding
    response_lengths: list[int]

    @classmethod
    def of(
        cls, experiences: list[Experience], pad_token_id: int, names: tuple[str, ...] = TRAINING_TENSORS
    ) -> RolloutPool:
        """The experiences' rows, in order, with their tensors `names` (Experience fields, `[B, T]`)."""
        P = max(e.batch.prompt_len for e in experiences)
        T = max(e.batch.response_mask.shape[1] for e in experiences)
        ids, attention, response, tensors = [], [], [], {name: [] for name in names}
        for e in experiences:
            b = e.batch
            left, right = P - b.prompt_len, T - b.response_mask.shape[1]
            ids.append(_pad_columns(b.input_ids, left, right, pad_token_id))
            attention.append(_pad_columns(b.attention_mask, left, right, 0))
            response.append(_pad_columns(b.response_mask, 0, right, False))
            for name in names:  # 0 past each response, as the old per-row records had
                masked = torch.where(b.response_mask, getattr(e, name), 0.0)
                tensors[name].append(_pad_columns(masked, 0, right, 0.0))
        attention_mask = torch.cat(attention)
        response_mask = torch.cat(response)
        lengths = torch.stack([attention_mask[:, :P].sum(-1), response_mask.sum(-1)]).tolist()  # one sync
        return cls(
            input_ids=torch.cat(ids),
            attention_mask=attention_mask,
            response_mask=response_mask,
            has_eos=torch.cat([e.batch.has_eos for e in experiences]),
            tensors={name: torch.cat(parts) for name, parts in tensors.items()},
            prompt_len=P,
            prompt_lengths=lengths[0],
            response_lengths=lengths[1],
        )

    def __len__(self) -> int:
        return len(self.response_lengths)

    def tokens(self, rows: list[int]) -> int:
        return sum(self.response_lengths[i] for i in rows)

    def micro_batch(self, rows: list[int]) -> tuple[ResponseBatch, dict[str, torch.Tensor]]:
        """Rows `rows` as `collate_responses` would lay them out, with their training tensors."""
        P = max(self.prompt_lengths[i] for i in rows)
        T = max(self.response_lengths[i] for i in rows)
        index = torch.as_tensor(rows, device=self.input_ids.device)
        columns = slice(self.prompt_len - P, self.prompt_len + T)
        attention_mask = self.attention_mask[index, columns]
        batch = ResponseBatch(
            input_ids=self.input_ids[index, columns],
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
            prompt_len=P,
            response_mask=self.response_mask[index, :T],
            has_eos=self.has_eos[index],
        )
        return batch, {name: t[index, :T] for name, t in self.tensors.items()}


def log_samples(
    path: Path, experience: Experience, tokenizer, prompt_messages, count: int, step: int
) -> None:
    """The first `count` generations of `experience`, with their segments and rewards, into samples.jsonl."""
    e = experience
    lines = []
    for row in range(min(count, e.batch.input_ids.shape[0])):
        length = int(e.batch.response_mask[row].sum())
        ids = e.batch.response_ids[row, :length].tolist()
        ends = [end + 1 for end in torch.nonzero(e.segments.ends[row, :length]).flatten().tolist()]
        # Decoded in context, so SentencePiece segments keep their leading spaces and concatenate
        # to the response text.
        texts = segment_texts(tokenizer, ids, ends)
        segments = [
            {"text": text, "reward": float(e.segments.rewards[row, begin:end].sum())}
            for text, begin, end in zip(texts, [0, *ends], ends, strict=False)
        ]
        prompt_ids = e.batch.prompt_ids(row)
        sample = {
            "step": step,
            "messages": prompt_messages(prompt_ids),
            "prompt": tokenizer.decode(prompt_ids),
            "response": tokenizer.decode(ids),
            "response_text": tokenizer.decode(ids, skip_special_tokens=True),
            "has_eos": bool(e.batch.has_eos[row]),
            "raw_reward": float(e.raw_score[row]),
            "segments": segments,
        }
        lines.append(json.dumps(sample))
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")
