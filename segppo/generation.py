"""Generation: sampling settings, stop tokens, cutting at the stop, and the `generate` call.

PPO, evaluation and the demo all generate through here, so every response has one token layout
whatever produced it: `segppo.data`'s `ResponseBatch` (left-padded prompts, right-padded responses
starting at column P), each row cut after its own first stop token (`has_eos`), a row that never
stops keeping `max_new_tokens` tokens with `has_eos` false, and an empty response replaced by one
pad token without EOS. An engine is anything with `generate(prompts, sampling, seeds=None) ->
ResponseBatch` (`Engine`); `HFEngine` is Hugging Face `generate`, and another engine (vLLM) plugs
in behind the same call.

Two ways to draw:
- `seeds=None` (PPO): the global torch RNG, so a row's draws depend on which rows share its batch;
  PPO seeds each micro-rollout itself, so a run is the same on any number of ranks.
- per-row `seeds` (evaluation): common random numbers across policies. Each (prompt, sample index)
  sees the same random numbers whichever policy answers it and however the rows are batched: two
  policies that agree on a prompt give the same response (a tie, not noise), and the result does
  not depend on the batch size. The distribution is the same: softmax(logits / temperature)
  restricted to the top-p nucleus (no top-k); the checkpoint's generation config adds no logits
  processors (repetition penalty, top-k, ...) in either mode. The draw is Gumbel-max: token =
  argmax(processed logits + g) with g = −log(−log u) for a uniform u computed by a counter-based
  hash of (row seed, step, token id), so it needs no RNG state and is a pure function of those
  three numbers. `SeededSampling` does the perturbation inside Hugging Face `generate` (a logits
  processor; greedy decoding takes the argmax).

Temperature 0 is greedy decoding (`SamplingConfig.greedy`), as in Hugging Face's do_sample=False
and vLLM's temperature 0: the argmax of the model's logits at each step, in either way of drawing
(there is nothing to draw, so the seeds change nothing) and whatever top_p. There is no distribution
to take log-probs of, so `generate_scored` (PPO) refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from segppo.context import Context, config_context
from segppo.data import EncodedPrompt, ResponseBatch, collate_prompts, collate_responses
from segppo.models.shared_prefix import prefilled_prompts


@dataclass
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy decoding (see `greedy`)
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    synced_gpus: bool = False  # ZeRO-3 on several ranks: every rank steps until all are done

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # NaN too: it would sample from NaN scores
            raise ValueError(f"temperature must be >= 0 (0: greedy decoding), got {self.temperature}")

    @property
    def greedy(self) -> bool:
        """Temperature 0: the argmax at each step, no draw (top_p does not apply)."""
        return self.temperature == 0

    def describe(self) -> dict:
        """What a run records of its sampling (run_config.json, eval's results.json): the whole
        distribution drawn from, or that decoding was greedy (then no top-p was applied)."""
        return {
            "decoding": "greedy" if self.greedy else "sampling",
            "temperature": self.temperature,
            "top_p": None if self.greedy else self.top_p,
            "top_k": None,  # no top-k
            "max_new_tokens": self.max_new_tokens,
            "stop_token_ids": list(self.stop_token_ids),
            # HFEngine never applies the checkpoint's generation_config (repetition penalty, top-k, ...)
            "checkpoint_generation_config": "not applied",
        }


def stop_token_ids(chat, tokenizer, extra: Sequence[str] | None) -> tuple[int, ...]:
    """The chat format's stop ids plus each `--stop-token` (one token of `tokenizer` each), deduplicated."""
    ids = list(chat.stop_token_ids)
    for token in extra or []:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"--stop-token {token!r} is not a single token of the policy's tokenizer")
        ids.append(int(token_id))
    return tuple(dict.fromkeys(ids))


def cut_row_at_stop(ids: Sequence[int], stop_token_ids) -> tuple[list[int], bool]:
    """(ids up to and including the first stop token, whether there was one) of one sequence."""
    stops = set(stop_token_ids)
    for i, token in enumerate(ids):
        if token in stops:
            return list(ids[: i + 1]), True
    return list(ids), False


def cut_at_stop(generated: torch.Tensor, stop_token_ids) -> tuple[list[list[int]], list[bool]]:
    """Each row's response up to and including its own first stop token; `has_eos` per row.

    Rows are cut independently: a row that stopped early never inherits another row's length, and
    one that never stopped keeps all its tokens with `has_eos = False`.
    """
    cut = [cut_row_at_stop(row, stop_token_ids) for row in generated.tolist()]
    return [ids for ids, _ in cut], [stopped for _, stopped in cut]


Prompts = Sequence[EncodedPrompt] | Sequence[Sequence[int]]


class Engine(Protocol):
    """What generates responses: one response per prompt, in `ResponseBatch` layout."""

    def generate(
        self, prompts: Prompts, sampling: SamplingConfig, seeds: Sequence[int] | None = None
    ) -> ResponseBatch: ...


def _prompt_ids(prompts: Prompts) -> list[list[int]]:
    return [list(p.prompt_ids) if isinstance(p, EncodedPrompt) else list(p) for p in prompts]


def check_fits_context(context: Context | None, prompt_ids: list[list[int]], sampling) -> None:
    """Every prompt plus `sampling.max_new_tokens` fits `context` (None: no limit), else one line
    naming the longest prompt; both engines call it before they generate."""
    if context is None or not prompt_ids:
        return
    row = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    context.check(
        len(prompt_ids[row]), sampling.max_new_tokens, prompt=f"the prompt of row {row}", new="max_new_tokens"
    )


def responses_batch(prompt_ids, generated: torch.Tensor, sampling: SamplingConfig, pad_token_id: int):
    """The `ResponseBatch` of `generated` (the new tokens only, `[B, N]`): cut, padded, collated."""
    responses, has_eos = cut_at_stop(generated, sampling.stop_token_ids)
    # An empty response (impossible with max_new_tokens ≥ 1; kept for safety) has no token to score,
    # so it keeps the pad token as a one-token, EOS-less response.
    responses = [r if r else [pad_token_id] for r in responses]
    return collate_responses(prompt_ids, responses, has_eos, pad_token_id)


@dataclass
class SampledScores:
    """What sampling already computed for each response token, `[B, T]` float32 on the batch's
    layout: the log-prob of the drawn token and the entropy of the distribution it was drawn from,
    both of softmax(logits / temperature) over the whole vocabulary (top-p does not truncate them),
    0 at padding. The same quantities `segppo.ppo.rollout.sampled_logprobs_and_entropy` recomputes
    with a forward pass over the finished sequences."""

    logprobs: torch.Tensor
    entropy: torch.Tensor


class DrawnTokenScores(LogitsProcessor):
    """Records, at each generation step, the log-prob and entropy of softmax(logits / temperature)
    and (at the next step, once it is known) the log-prob of the token drawn.

    Hugging Face applies a caller's processors before its temperature and top-p warpers, so this
    one sees the model's own logits. It changes nothing; one step's logits are kept at a time.
    """

    def __init__(self, temperature: float):
        if not temperature > 0:
            raise ValueError(
                f"no log-probs at temperature {temperature}: greedy decoding draws from no distribution "
                "(PPO's log-probs, ratios and KL are taken at a positive sampling temperature)"
            )
        self.inv_temp = 1.0 / temperature
        self.logprobs: list[torch.Tensor] = []  # [B] per step, of the token drawn at that step
        self.entropy: list[torch.Tensor] = []  # [B] per step
        self._last_logp: torch.Tensor | None = None  # [B, V] the last step's log-softmax

    def _take_drawn(self, tokens: torch.Tensor) -> None:
        if self._last_logp is not None:
            self.logprobs.append(self._last_logp.gather(1, tokens[:, None]).squeeze(1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last_logp is not None:
            self._take_drawn(input_ids[:, -1])
        logp = torch.log_softmax(scores.float() * self.inv_temp, dim=-1)
        self.entropy.append(-(logp.exp() * logp).sum(-1))
        self._last_logp = logp
        return scores

    def finish(self, generated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, N]` log-probs and entropy of the `N` generated tokens (`generated` `[B, N]`)."""
        self._take_drawn(generated[:, len(self.logprobs)])
        self._last_logp = None
        return torch.stack(self.logprobs, 1), torch.stack(self.entropy, 1)


@dataclass
class HFEngine:
    """Hugging Face `generate` on a (possibly DeepSpeed-wrapped) causal LM."""

    model: object
    pad_token_id: int
    device: torch.device | str = "cpu"

    @torch.no_grad()
    def generate(
        self, prompts: Prompts, sampling: SamplingConfig, seeds: Sequence[int] | None = None
    ) -> ResponseBatch:
        return self._generate(prompts, sampling, seeds)[0]

    @torch.no_grad()
    def generate_scored(
        self, prompts: Prompts, sampling: SamplingConfig
    ) -> tuple[ResponseBatch, SampledScores]:
        """`generate` (global-RNG draws) and the `SampledScores` of every response token."""
        recorder = DrawnTokenScores(sampling.temperature)
        batch, generated = self._generate(prompts, sampling, None, recorder)
        logprobs, entropy = recorder.finish(generated)
        T, mask = batch.response_mask.shape[1], batch.response_mask
        scores = SampledScores(
            torch.where(mask, logprobs[:, :T].to(mask.device), 0.0),
            torch.where(mask, entropy[:, :T].to(mask.device), 0.0),
        )
        return batch, scores

    def _generate(self, prompts, sampling, seeds, recorder: DrawnTokenScores | None = None):
        """(the ResponseBatch, the `[B, N]` tokens generate drew)."""
        prompt_ids = _prompt_ids(prompts)
        module = getattr(self.model, "module", self.model)
        name = module.config.name_or_path or type(module).__name__
        check_fits_context(config_context(module.config, name), prompt_ids, sampling)
        batch = collate_prompts(prompt_ids, self.pad_token_id).to(self.device)
        width = batch.input_ids.shape[1]
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        if sampling.greedy:  # nothing is drawn: the seeds, like the global RNG, change nothing
            draw = dict(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None)
        elif seeds is None:
            draw = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            processor = SeededSampling(
                torch.as_tensor(list(seeds), dtype=torch.int64, device=self.device),
                prompt_width=width,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
            )
            draw = dict(  # the argmax of the Gumbel-perturbed logits is the sample
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=LogitsProcessorList([processor]),
            )
        processors = draw.pop("logits_processor", None)
        if recorder is not None:
            processors = LogitsProcessorList([recorder, *(processors or [])])
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=list(sampling.stop_token_ids),
            pad_token_id=self.pad_token_id,
            **draw,
        )
        input_ids, attention_mask, cached = batch.input_ids, batch.attention_mask, {}
        prefilled = prefilled_prompts(module, input_ids, attention_mask)  # the prompts' common prefix
        if prefilled is not None:
            input_ids, attention_mask, cached = prefilled
        with _only_generation_config(module, config):
            out = module.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=processors,
                synced_gpus=sampling.synced_gpus,
                **cached,
            )
        generated = out[:, width:]
        return responses_batch(prompt_ids, generated, sampling, self.pad_token_id).to(self.device), generated


@contextmanager
def _only_generation_config(module, config: GenerationConfig):
    """`config` as the model's generation config for one call.

    Hugging Face `generate` fills every field a passed config leaves at the library default from the
    checkpoint's `generation_config.json` (repetition_penalty, top_k, no_repeat_ngram_size, ...), so
    an explicit config alone does not keep a checkpoint's processors out; the sampled distribution
    must be exactly softmax(logits / temperature) within top-p, the one PPO's log-probs score.
    """
    saved = module.generation_config
    module.generation_config = config
    try:
        yield
    finally:
        module.generation_config = saved


def generate(model, prompts: Prompts, sampling: SamplingConfig, pad_token_id: int, device) -> ResponseBatch:
    """One response per prompt from `model` with Hugging Face `generate`, global-RNG draws."""
    return HFEngine(model, pad_token_id, device).generate(prompts, sampling)


def generate_seeded(
    model, prompts: Prompts, sampling: SamplingConfig, seeds: Sequence[int], pad_token_id: int, device
) -> ResponseBatch:
    """One response per prompt, row `i` drawing with `seeds[i]` (see the module doc)."""
    return HFEngine(model, pad_token_id, device).generate(prompts, sampling, seeds)


# ---------------------------------------------------------------------------------------------
# Per-row seeded draws

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


def seed_for(*parts: int) -> int:
    """PPO's seed for the global RNG from (run seed, step, micro-rollout or epoch, ...).

    Kept apart from `row_seed` (eval's per-row seeds): changing either changes what a run draws.
    """
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (2**31 - 1)
    return value


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
    prompt_width` is the number of tokens generated so far (the step). At temperature 0 it changes
    nothing (no noise, no division): the argmax is greedy decoding's (`sample_token`; `HFEngine`
    decodes greedily without it).
    """

    def __init__(self, seeds: torch.Tensor, prompt_width: int, temperature: float = 1.0, top_p: float = 1.0):
        self.seeds = seeds
        self.prompt_width = prompt_width
        self.greedy = temperature == 0  # the argmax, whatever top_p: the top token is in every nucleus
        self.warpers = []
        if not self.greedy and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if not self.greedy and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return scores
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
