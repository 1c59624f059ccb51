"""Batched sampling in which every row has its own seed: common random numbers across policies.

PPO samples with the global torch RNG (`segppo.ppo.rollout.generate`), so a row's draws depend on
which other rows share its batch. Evaluation wants each (prompt, sample index) to see the same
random numbers whichever policy answers it and however the rows are batched: two policies that
agree on a prompt then give the same response (a tie, not noise), and the result does not depend
on `--batch-size`.

The distribution is the same as PPO's: softmax(logits / temperature) restricted to the top-p
nucleus (no top-k), after whatever logits processors the model's generation config adds. The
draw is Gumbel-max: token = argmax(processed logits + g) with g = −log(−log u) for a uniform u
computed by a counter-based hash of (row seed, step, token id), so it needs no RNG state at all
and is a pure function of those three numbers. `SeededSampling` does the perturbation inside
Hugging Face `generate` (as a logits processor, with greedy decoding taking the argmax).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from segppo.data import EncodedPrompt, ResponseBatch, collate_prompts, collate_responses
from segppo.ppo.rollout import SamplingConfig, cut_at_stop

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for int64 x in [0, 2³²), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def hash32(x):
    """A 32-bit integer mixing function (xorshift-multiply, "lowbias32"): int64 tensors or ints."""
    if isinstance(x, int):
        x &= _M32
        x ^= x >> 16
        x = (x * 0x7FEB352D) & _M32
        x ^= x >> 15
        x = (x * 0x846CA68B) & _M32
        return x ^ (x >> 16)
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_seed(seed: int, *parts: int) -> int:
    """A 32-bit seed for one row from the run's seed and the row's coordinates (prompt, sample, turn)."""
    x = seed & _M32
    for part in parts:
        x = hash32(x ^ hash32((part & _M32) + 0x9E3779B9))
    return x


def gumbel_noise(seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise `[B, V]` float64, a pure function of (seed[b], step, token id)."""
    device = seeds.device
    key = hash32(seeds.to(torch.int64) ^ hash32(torch.tensor(step, dtype=torch.int64, device=device) + 1))
    tokens = hash32(torch.arange(vocab_size, dtype=torch.int64, device=device) * 2 + 1)
    bits = hash32(key[:, None] ^ tokens[None, :])
    u = (bits.to(torch.float64) + 0.5) / 2.0**32  # in (0, 1)
    return -torch.log(-torch.log(u))


class SeededSampling(LogitsProcessor):
    """Temperature, top-p, then Gumbel noise keyed by each row's seed; greedy decoding samples.

    `prompt_width` is the padded prompt width of the batch, so that `input_ids.shape[1] −
    prompt_width` is the number of tokens generated so far (the step).
    """

    def __init__(self, seeds: torch.Tensor, prompt_width: int, temperature: float = 1.0, top_p: float = 1.0):
        self.seeds = seeds
        self.prompt_width = prompt_width
        self.warpers = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        step = input_ids.shape[1] - self.prompt_width
        noise = gumbel_noise(self.seeds.to(scores.device), step, scores.shape[-1])
        return (scores.double() + noise).to(scores.dtype)


def sample_token(logits: torch.Tensor, seeds: torch.Tensor, step: int, temperature=1.0, top_p=1.0):
    """One seeded draw per row from `logits [B, V]` (what `SeededSampling` makes generate do)."""
    processor = SeededSampling(seeds, prompt_width=0, temperature=temperature, top_p=top_p)
    dummy = torch.zeros(logits.shape[0], step, dtype=torch.long, device=logits.device)
    return processor(dummy, logits.float()).argmax(-1)


@torch.no_grad()
def generate_seeded(
    model,
    prompts: Sequence[EncodedPrompt] | Sequence[Sequence[int]],
    sampling: SamplingConfig,
    seeds: Sequence[int],
    pad_token_id: int,
    device,
) -> ResponseBatch:
    """Sample one response per prompt, row `i` drawing with `seeds[i]`; PPO's response layout.

    Like `segppo.ppo.rollout.generate`: each row is cut after its own first stop token
    (`has_eos`), and a row that never stops keeps `max_new_tokens` tokens with `has_eos` false.
    """
    prompt_ids = [list(p.prompt_ids) if isinstance(p, EncodedPrompt) else list(p) for p in prompts]
    if len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
    batch = collate_prompts(prompt_ids, pad_token_id).to(device)
    width = batch.input_ids.shape[1]
    processor = SeededSampling(
        torch.as_tensor(list(seeds), dtype=torch.int64, device=device),
        prompt_width=width,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
    )
    module = getattr(model, "module", model)
    out = module.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        do_sample=False,  # the argmax of the Gumbel-perturbed logits is the sample
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        logits_processor=LogitsProcessorList([processor]),
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=list(sampling.stop_token_ids),
        pad_token_id=pad_token_id,
    )
    responses, has_eos = cut_at_stop(out[:, width:], sampling.stop_token_ids)
    responses = [r if r else [pad_token_id] for r in responses]
    return collate_responses(prompt_ids, responses, has_eos, pad_token_id)
