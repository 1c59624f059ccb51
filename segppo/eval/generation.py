"""Generating the responses of one policy to an evaluation set: batched, seeded, one or two turns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from segppo.data import ChatFormat, PromptExample
from segppo.generation import Engine, HFEngine, SamplingConfig, row_seed

from .prompts import EvalPrompt


@dataclass
class Generation:
    """One response (sample `sample` of `prompt`), its turns and, once scored, its scores.

    For two turns, `turns` holds both responses and `messages`/`prompt_ids` are the final turn's
    prompt (first question, first answer, second question); `response_ids`, `has_eos` and
    `length` are the final turn's, in the policy's tokens (stop token included).
    """

    prompt: EvalPrompt
    sample: int
    turns: list[str] = field(default_factory=list)  # response text of each turn (stripped)
    messages: list[dict] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    has_eos: bool = False
    prompt_truncated: bool = False
    score: float | None = None
    normalized_reward: float | None = None  # Σ of the normalized segment rewards (RM only)
    num_segments: int | None = None  # RM only
    scored_tokens: int | None = None  # response tokens as the RM read them (RM only)

    @property
    def response(self) -> str:
        """The final turn's response text."""
        return self.turns[-1]

    @property
    def length(self) -> int:
        return len(self.response_ids)

    def to_dict(self) -> dict:
        return {
            "prompt_id": self.prompt.id,
            "prompt_index": self.prompt.index,
            "sample": self.sample,
            "messages": self.messages,
            "turns": self.turns,
            "response": self.response,
            "length": self.length,
            "has_eos": self.has_eos,
            "score": self.score,
            "normalized_reward": self.normalized_reward,
            "segments": self.num_segments,
        }


def load_engine(
    folder: str,
    pad_token_id: int,
    *,
    rollout_engine: str = "hf",
    bf16: bool = False,
    max_len: int | None = None,
    seed: int = 0,
    device="cpu",
    trust_remote_code: bool = False,
) -> Engine:
    """The generation engine `--rollout-engine` names, on one policy folder.

    hf: the causal LM on `device`, sampled with common random numbers (`row_seed`): every policy
    draws the same numbers per prompt, so any batching gives the same responses. vllm: an
    in-process vLLM engine (`segppo.vllm_engine`; float32 unless `bf16`) where each row is one
    request seeded with its `row_seed`: a rerun gives the same responses, but vLLM's sampler does not
    draw the hf engine's Gumbel noise, so its samples are not hf's. At temperature 0 both decode
    greedily (the argmax at each step): the same responses, but where two tokens' logits are within
    float error of each other. `max_len` (prompt plus response tokens, capped at the model's
    context: `segppo.context`) bounds vLLM's sequences; call `close_engine` when done.
    """
    if rollout_engine == "hf":
        from segppo.models import load_policy

        model = load_policy(folder, dtype="bf16" if bf16 else None, trust_remote_code=trust_remote_code)
        return HFEngine(model.to(device).eval(), pad_token_id, device)
    from segppo.vllm_engine import VLLMEngine

    return VLLMEngine(
        folder,
        pad_token_id=pad_token_id,
        dtype="bfloat16" if bf16 else "float32",
        max_model_len=max_len,
        seed=seed,
        trust_remote_code=trust_remote_code,
    )


def close_engine(engine: Engine) -> None:
    """Free an engine's model (and a vLLM engine's KV cache) before the next policy loads."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def generate_responses(
    model,
    tokenizer,
    chat: ChatFormat,
    prompts: Sequence[EvalPrompt],
    sampling: SamplingConfig,
    *,
    num_samples: int = 1,
    turns: int = 1,
    batch_size: int = 16,
    seed: int = 42,
    max_prompt_len: int | None = None,
    long_prompts: str = "error",
    device="cpu",
    on_batch: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """`num_samples` responses per prompt, prompt-major (`[p0s0, p0s1, ..., p1s0, ...]`).

    The first turn's prompt is `chat.encode_prompt` of the prompt messages (PPO's formatting,
    `max_prompt_len` and `long_prompts` as in PPO). With `turns=2` the first response is appended
    as an assistant message, followed by the prompt's next user turn, and the model answers again;
    that second prompt is not truncated. Row (prompt i, sample s, turn t) samples with
    `row_seed(seed, i, s, t)`, whatever the policy and the batching. `on_batch(n, tokens)` is called
    after each generate call with its number of responses and of generated tokens. `model` is a
    causal LM (generated with `HFEngine`) or any `Engine`.
    """
    engine: Engine = (
        HFEngine(model, chat.pad_token_id, device) if isinstance(model, torch.nn.Module) else model
    )
    if turns < 1:
        raise ValueError(f"turns must be at least 1, got {turns}")
    generations: list[Generation] = []
    for prompt in prompts:
        if len(prompt.followups) < turns - 1:
            raise ValueError(
                f"prompt {prompt.id!r} has {1 + len(prompt.followups)} turn(s), fewer than {turns}"
            )
        encoded = chat.encode_prompt(
            PromptExample(prompt.messages, row=prompt.row),
            max_prompt_len=max_prompt_len,
            on_long_prompt=long_prompts,
        )
        for sample in range(num_samples):
            generations.append(
                Generation(
                    prompt=prompt,
                    sample=sample,
                    messages=[dict(m) for m in prompt.messages],
                    prompt_ids=list(encoded.prompt_ids),
                    prompt_truncated=encoded.truncated,
                )
            )
    for turn in range(turns):
        if turn > 0:
            for g in generations:
                g.messages = [
                    *g.messages,
                    {"role": "assistant", "content": g.turns[-1]},
                    {"role": "user", "content": g.prompt.followups[turn - 1]},
                ]
                g.prompt_ids = chat.prompt_ids(g.messages)
        # Longest prompts first: less padding per batch, and an out-of-memory shows at once.
        order = sorted(range(len(generations)), key=lambda i: (-len(generations[i].prompt_ids), i))
        for start in range(0, len(order), batch_size):
            rows = [generations[i] for i in order[start : start + batch_size]]
            seeds = [row_seed(seed, g.prompt.index, g.sample, turn) for g in rows]
            batch = engine.generate([g.prompt_ids for g in rows], sampling, seeds)
            lengths = batch.response_mask.sum(-1).tolist()
            responses = batch.response_ids.tolist()
            for g, ids, n, eos in zip(rows, responses, lengths, batch.has_eos.tolist(), strict=True):
                g.response_ids, g.has_eos = ids[:n], bool(eos)
                g.turns.append(chat.response_text(g.messages, g.response_ids, g.has_eos))
            if on_batch is not None:
                on_batch(len(rows), sum(lengths))
    return generations
