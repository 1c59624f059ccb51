"""The demo's tiny SFT policy: a Llama-style model trained from scratch on the demonstrator corpus.

`sft_policy(cache_dir)` trains once and then reuses the saved folder: the folder's name is a hash
of the task (version and fingerprint) and every training setting, so a change to either trains a
new one. Training
is plain torch AdamW on prompt + response sequences with the loss on response tokens only (the
EOS included), seeded and deterministic on a given machine and thread count. The folder is an
ordinary segppo policy folder (safetensors, tokenizer with its chat template, `segppo.json`),
written atomically, so a crash never leaves half a cache entry behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from segppo.io import atomic_write_json
from segppo.models import SegppoMetadata, save_policy

from .task import TASK_VERSION, Demonstrator, sft_corpus, vocabulary
from .tokenizer import CHAT_TEMPLATE, build_tokenizer, render_conversation, render_prompt

TRAINING_FILE = "demo_sft.json"  # what the cached policy was trained with, and how long it took


@dataclass(frozen=True)
class SFTSettings:
    """Model size and training of the SFT policy. Every field is part of the cache key.

    Training has two phases, like a base model's pretraining followed by SFT: `pretrain_steps`
    on clean demonstrations (`pretrain_p_correct`), in which the model learns the language and to
    copy slot values from the prompt, then `sft_steps` on the mediocre demonstrator
    (`p_correct`), which the final policy imitates. From the mediocre data alone a model this small
    takes far longer than the demo's budget to learn copying (the signal is halved by the noise).
    """

    task: str = "animals"  # the gold task whose demonstrations the policy learns (`segppo.demo.task.TASKS`)
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    pretrain_steps: int = 600
    pretrain_p_correct: float = 1.0
    # The pretraining demonstrator's chance of writing a prompt's phrases in a random order (None:
    # its default, 0.3). In the demonstrations the prompt's order mostly tells which animal comes
    # next, so a model need not look a color's animal up in the prompt; at 1.0 it must.
    pretrain_p_shuffle: float | None = None
    sft_steps: int = 600
    p_correct: float = 0.5
    batch_size: int = 64
    lr: float = 1e-2
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.pretrain_steps + self.sft_steps

    def key(self) -> str:
        """The cache key: a hash of these settings, the task version and a fingerprint of the task
        (its vocabulary, chat template and a few demonstrations), so that editing the task's code
        without bumping TASK_VERSION still trains a new policy."""
        sample = sft_corpus(16, 0, task=self.task)
        # Fields left at None are left out, so that adding one keeps the existing cache entries.
        settings = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        text = json.dumps(
            {
                "task_version": TASK_VERSION,  # not "task": that is a field, the task's name
                "vocabulary": vocabulary(),
                "template": CHAT_TEMPLATE,
                "sample": [sample.prompts, sample.responses],
                **settings,
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# How many times this process trained a policy (rather than reusing a cached one); for tests.
TRAIN_COUNT = 0


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/segppo/demo`, or `~/.cache/segppo/demo`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "segppo" / "demo"


def sft_policy(
    cache_dir: str | os.PathLike | None = None, settings: SFTSettings | None = None, *, log=None
) -> Path:
    """The folder of the SFT policy for `settings`, trained and saved on the first call only."""
    settings = settings or SFTSettings()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / f"sft-{settings.key()}"
    if (folder / TRAINING_FILE).is_file():
        return folder
    global TRAIN_COUNT
    TRAIN_COUNT += 1
    model, info = train_sft(settings, log=log)
    tokenizer = build_tokenizer()
    metadata = SegppoMetadata(
        kind="policy",
        data={"demo_task": TASK_VERSION, "sft": dataclasses.asdict(settings)},
        base_model=None,
    )
    save_policy(model, tokenizer, folder, metadata)  # atomic: the whole folder or nothing
    # Written last: its presence marks a complete entry, and an entry without it is trained again.
    atomic_write_json(folder / TRAINING_FILE, info)
    return folder


def model_config(settings: SFTSettings, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def encode_corpus(tokenizer, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], list[int]]:
    """(ids of each whole conversation, length of its prompt part) as the chat template renders them.

    Rendered directly (the tests check it equals `ChatFormat`'s ids) because templating tens of
    thousands of conversations through jinja would take longer than the training.
    """
    full = tokenizer([render_conversation(p, r) for p, r in zip(prompts, responses, strict=True)])
    prompt = tokenizer([render_prompt(p) for p in prompts])
    return full["input_ids"], [len(ids) for ids in prompt["input_ids"]]


def _batch(ids: list[list[int]], prompt_lens: list[int], pad: int) -> tuple[torch.Tensor, ...]:
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), pad, dtype=torch.long)
    labels = torch.full((len(ids), T), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, (x, p) in enumerate(zip(ids, prompt_lens, strict=True)):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        labels[i, p : len(x)] = input_ids[i, p : len(x)]
    return input_ids, mask, labels


def train_sft(settings: SFTSettings, *, log=None, callback=None) -> tuple[LlamaForCausalLM, dict]:
    """Train the SFT policy from scratch; returns the model (eval mode) and a training summary.

    `log(message)` gets the loss every 200 steps; `callback(step, model)` runs after every step.
    """
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    phases = []  # (steps, ids, prompt lengths) of each phase
    shuffle = {} if settings.pretrain_p_shuffle is None else {"p_shuffle": settings.pretrain_p_shuffle}
    for i, (steps, demonstrator) in enumerate(
        [
            (settings.pretrain_steps, Demonstrator(settings.pretrain_p_correct, **shuffle)),
            (settings.sft_steps, Demonstrator(settings.p_correct)),
        ]
    ):
        if steps:
            corpus = sft_corpus(
                steps * settings.batch_size, settings.seed * 2 + i, demonstrator, task=settings.task
            )
            phases.append((steps, *encode_corpus(tokenizer, corpus.prompts, corpus.responses)))

    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(model_config(settings, tokenizer))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    losses = []
    step = 0
    for steps, ids, prompt_lens in phases:
        for j in range(steps):  # each example once
            rows = range(j * settings.batch_size, (j + 1) * settings.batch_size)
            input_ids, mask, labels = _batch([ids[i] for i in rows], [prompt_lens[i] for i in rows], 0)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step += 1
            if log is not None and step % 200 == 0:
                log(f"sft step {step}/{settings.steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
            if callback is not None:
                callback(step, model)
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tail = losses[-50:]
    info = {
        "settings": dataclasses.asdict(settings),
        "task_version": TASK_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": sum(tail) / len(tail) if tail else None,
        "seconds": round(time.perf_counter() - start, 2),
        "threads": torch.get_num_threads(),
    }
    return model, info
