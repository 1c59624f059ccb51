"""Tiny tokenizers and random-weight models for tests: built locally, no network.

`tiny_tokenizer()` is a byte-level BPE trained on a few sentences, with ChatML-style turn tokens
and a chat template whose end-of-turn token is the EOS. `tiny_config(arch)` gives a
transformers config of a few thousand parameters for each architecture the project supports, with
tied variants (`TIED_ARCHITECTURES`: the LM head is the input embedding, as in SmolLM2, Llama-3.2,
Qwen2.5-0.5B and GPT-2).
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A spider has eight legs, arranged in four pairs.",
    "How many legs does a spider have? Spiders have six legs like other insects.",
    "The capital of France is Paris. I think it is Lyon.",
    "Put it in boiling water for about nine minutes, then cool it in cold water.",
    "Red leaves drift and fall; cool wind hums through empty trees.",
    "Name a prime number greater than 10. 11 is prime. 12 is prime.",
    "Translate thank you into Spanish: Gracias. Merci.",
    "0123456789 + - * / = ( ) [ ] { } < > ' \" ! ? , . ; :",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 384, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A fast tokenizer with pad, EOS (`<|im_end|>` when templated) and an optional ChatML template."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        pad_token="<pad>",
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        bos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"] if chat_template else [],
    )
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


_ARCH = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2),
    "mistral": dict(model_type="mistral", num_key_value_heads=2),
    "phi3": dict(model_type="phi3", num_key_value_heads=2),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "gpt_neox": dict(model_type="gpt_neox", rotary_pct=1.0),
    # Tied input and output embeddings: one weight, two uses (GPT-2 ties by default too).
    "llama-tied": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-tied": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
}

ARCHITECTURES = tuple(_ARCH)  # causal LMs that are reward-model backbones too (*ForTokenClassification)
_ARCH.update(  # policy-only here: Gemma-3 has no *ForTokenClassification in transformers 5.24
    {
        # Gemma-3 1B (text only, tied like the hub checkpoint; no logit softcapping, unlike Gemma-2).
        "gemma3": dict(model_type="gemma3_text", num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
        "smollm3": dict(model_type="smollm3", num_key_value_heads=2),
        "qwen3-moe": dict(
            model_type="qwen3_moe",
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
    }
)
TIED_ARCHITECTURES = ("llama-tied", "qwen2-tied", "gpt2")


def tiny_config(arch: str = "llama", vocab_size: int = 384, **overrides):
    """A transformers config for a random-weight model of ~100k parameters."""
    spec = dict(_ARCH[arch])
    model_type = spec.pop("model_type")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    if model_type == "gpt2":
        common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=3)
    common.update(spec)
    common.update(overrides)
    return AutoConfig.for_model(model_type, **common)


FILLER = ["the", "fox", "dog", "legs", "water", "cold", "red", "trees", "wind"]


def write_preferences(path, n: int = 400, seed: int = 0, words: int = 8) -> str:
    """A preference set whose label depends on local content: the chosen response says "Paris"
    where the rejected one says "Lyon", somewhere among random filler words."""
    import json
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        filler = [rng.choice(FILLER) for _ in range(words)]
        at = rng.randrange(words)
        chosen, rejected = list(filler), list(filler)
        chosen[at], rejected[at] = "Paris", "Lyon"
        rows.append(
            {"prompt": "Name the capital.", "chosen": " ".join(chosen), "rejected": " ".join(rejected)}
        )
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def save_tiny_lm(folder, arch: str = "llama", seed: int = 0) -> str:
    """Save a random-weight causal LM and the tiny tokenizer as a model folder."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def tiny_rm_config(model, dataset, output, **overrides):
    """An RMConfig sized for tests: the Paris/Lyon set trains to >90% held-out accuracy in seconds."""
    from segppo.config import RMConfig

    values = dict(
        model=model,
        dataset=dataset,
        output=str(output),
        lr=3e-3,
        batch_size=16,
        micro_batch_size=8,
        epochs=1,
        max_len=64,
        max_prompt_len=32,
        zero_stage=0,
        eval_fraction=0.2,
        warmup_ratio=0.0,
        seed=0,
    )
    values.update(overrides)
    return RMConfig(**values)


def tiny_ppo_config(policy, ppo_inputs, output, **overrides):
    """A 2-step PPO run on the tiny models; `ppo_inputs` = (reward model folder, prompts file)."""
    from segppo.config import PPOConfig

    reward_model, prompts = ppo_inputs
    values = dict(
        policy=policy,
        reward_model=reward_model,
        prompts=prompts,
        output=str(output),
        rollout_batch_size=16,
        micro_rollout_batch_size=8,
        train_batch_size=16,
        micro_train_batch_size=8,
        max_new_tokens=8,
        max_prompt_len=32,
        actor_lr=1e-2,
        critic_lr=1e-2,
        critic_init="rm",
        ppo_epochs=1,
        zero_stage=0,
        warmup_ratio=0.0,
        max_steps=2,
        num_logged_samples=0,
        seed=0,
    )
    return PPOConfig(**{**values, **overrides})
