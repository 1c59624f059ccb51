"""PPO on real checkpoints' shapes (issue 10): the RM's recorded chat format, precision, numerics.

- the policy's stop ids and end of turn are the ones the RM recorded in segppo.json, and the policy
  export records them; samples.jsonl segments keep SentencePiece spaces (items 1, 6);
- eval's re-encoding truncates prompt content, never the template's tokens (item 4);
- the first rollout's KL is 0 in float32 and under --bf16 (item 8);
- log-probs at the sampling temperature; a checkpoint's generation_config processors never apply
  (item 9); the policy-entropy metric is that of the distributions the tokens were drawn from
  (item 12); log-probs, entropy and critic values under left padding equal a loop over unpadded
  single sequences (item 14);
- --kl-target per token; the --reference tokenizer is checked (item 13).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_chat_templates import ids_of, llama3, phi3, user
from tiny import tiny_config, tiny_rm_config, write_preferences
from transformers import AutoModelForCausalLM, GenerationConfig

from segppo.data import ChatFormat, PromptExample, collate_responses
from segppo.generation import HFEngine, SamplingConfig
from segppo.models import SegppoMetadata, create_reward_model, load_policy, load_tokenizer
from segppo.ppo.rollout import critic_values, sampled_logprobs_and_entropy
from segppo.ppo.trainer import train_ppo
from segppo.rm.scoring import encode_for_reward_model
from segppo.segments import logprobs_and_entropy
from segppo.tracking import read_metrics

# -- a Phi-3-shaped policy and token RM (end of turn <|end|>, then EOS; three generation-config EOS) --


@pytest.fixture(scope="module")
def phi3_run(tmp_path_factory):
    """(policy folder, RM run folder, prompts file) with the Phi-3 structure."""
    root = tmp_path_factory.mktemp("phi3")
    tokenizer = phi3()
    endoftext, assistant_id, end = ids_of(tokenizer, "<|endoftext|>", "<|assistant|>", "<|end|>")
    folder = root / "policy"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=[endoftext, assistant_id, end]).save_pretrained(folder)
    data = write_preferences(root / "prefs.jsonl", n=40)
    cfg = tiny_rm_config(str(folder), data, root / "rm", granularity="token", max_steps=2)
    from segppo.rm.trainer import train_reward_model

    train_reward_model(cfg)
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": p} for p in ["Name a prime number greater than 10.", "Name the capital."] * 8]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(folder), str(root / "rm"), str(prompts)


def ppo(policy, rm, prompts, output, **overrides):
    from segppo.config import PPOConfig

    values = dict(
        policy=policy,
        reward_model=rm,
        prompts=prompts,
        output=str(output),
        rollout_batch_size=8,
        micro_rollout_batch_size=4,
        train_batch_size=8,
        micro_train_batch_size=4,
        max_new_tokens=8,
        max_prompt_len=48,
        critic_init="sft",
        ppo_epochs=1,
        zero_stage=0,
        warmup_ratio=0.0,
        max_steps=1,
        seed=0,
        num_logged_samples=4,
    )
    values.update(overrides)
    cfg = PPOConfig(**values)
    train_ppo(cfg)
    return cfg.output_dir


def test_ppo_uses_and_exports_the_stop_ids_the_rm_recorded(phi3_run, tmp_path):
    policy, rm, prompts = phi3_run
    tokenizer = load_tokenizer(policy)
    user_id = tokenizer.convert_tokens_to_ids("<|user|>")
    rm_json = tmp_path / "rm"
    import shutil

    shutil.copytree(rm, rm_json)
    meta_path = rm_json / "model" / "segppo.json"
    meta = SegppoMetadata.load(meta_path)
    assert user_id not in meta.stop_token_ids  # not derivable from the tokenizer: only recorded
    meta.stop_token_ids = [*meta.stop_token_ids, user_id]
    meta.save(meta_path)

    out = ppo(policy, str(rm_json), prompts, tmp_path / "run")
    exported = SegppoMetadata.load(out / "policy" / "segppo.json")
    assert exported.stop_token_ids == meta.stop_token_ids
    assert exported.end_of_turn_id == meta.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|end|>")
    assert ChatFormat.from_metadata(tokenizer, exported).stop_token_ids == meta.stop_token_ids

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples
    for s in samples:  # SentencePiece segments decoded in context concatenate to the response
        assert "".join(seg["text"] for seg in s["segments"]) == s["response"]
    spaced = [seg["text"] for s in samples for seg in s["segments"] if seg["text"].startswith(" ")]
    assert spaced  # token segments of a Metaspace tokenizer: some begin with their space


def test_eval_reencoding_truncates_content_and_keeps_bos_and_header():
    tokenizer = llama3()
    chat = ChatFormat(tokenizer)
    bos, header = ids_of(tokenizer, "<|begin_of_text|>", "<|start_header_id|>")
    question = "The capital of France is Paris. I think it is Lyon. " * 4 + "Name the capital."
    full = chat.prompt_ids([user(question)])
    prompt_ids, response_ids, has_eos = encode_for_reward_model(
        chat, [user(question)], "Paris.", True, max_prompt_len=len(full) - 10
    )
    assert len(prompt_ids) <= len(full) - 10 and prompt_ids[:2] == [bos, header]
    assert tokenizer.decode(prompt_ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert has_eos and tokenizer.decode(response_ids) == "Paris.<|eot_id|>"


# -- numerics under left padding, temperature, aligned entropy (items 9, 12, 14) --------------------


def _left_padded_batch(tokenizer):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    responses = [[20, 21, 22], [23], [24, 25, 26, 27, 28]]
    batch = collate_responses(prompts, responses, [True, False, True], tokenizer.pad_token_id)
    return prompts, responses, batch


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_entropy_and_values_under_left_padding_equal_single_sequences(tiny_lm_dir, temperature):
    tokenizer = load_tokenizer(tiny_lm_dir)
    model = load_policy(tiny_lm_dir).eval()
    critic = create_reward_model(tiny_lm_dir).eval()
    prompts, responses, batch = _left_padded_batch(tokenizer)
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
    with torch.no_grad():
        logprobs, next_entropy = logprobs_and_entropy(model, *args, temperature=temperature)
        sampled_logprobs, sampled_entropy = sampled_logprobs_and_entropy(model, batch, temperature)
        values = critic_values(critic, batch)
        for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            ids = torch.tensor([p + r])
            logits = model(input_ids=ids).logits[0].double() / temperature
            log_softmax = logits.log_softmax(-1)
            entropy = -(log_softmax.exp() * log_softmax).sum(-1)
            P, T = len(p), len(r)
            drawn_from = slice(P - 1, P + T - 1)  # the distribution token t was sampled from
            expected_logprobs = log_softmax[drawn_from].gather(1, torch.tensor(r)[:, None]).squeeze(1)
            torch.testing.assert_close(logprobs[row, :T].double(), expected_logprobs, atol=1e-4, rtol=0)
            torch.testing.assert_close(
                sampled_logprobs[row, :T].double(), expected_logprobs, atol=1e-4, rtol=0
            )
            # Policy-entropy metric: the distributions the tokens were drawn from (item 12) ...
            torch.testing.assert_close(
                sampled_entropy[row, :T].double(), entropy[drawn_from], atol=1e-4, rtol=0
            )
            # ... the segmenter's: the distribution after each token, columns P .. P+T-1.
            torch.testing.assert_close(next_entropy[row, :T].double(), entropy[P : P + T], atol=1e-4, rtol=0)
            from segppo.models.reward_model import reward_values

            single = reward_values(critic, ids, torch.ones_like(ids), None)[0]
            torch.testing.assert_close(values[row, :T], single[drawn_from], atol=1e-4, rtol=0)


def test_checkpoint_generation_config_processors_do_not_apply(tiny_lm_dir, tmp_path):
    """A checkpoint whose generation_config.json sets sampling fields and logits processors samples
    exactly as one without, in both draws: PPO's log-probs score softmax(logits / T) within top-p."""
    tokenizer = load_tokenizer(tiny_lm_dir)
    chat = ChatFormat(tokenizer)
    clean = load_policy(tiny_lm_dir).eval()
    prompts = [chat.encode_prompt(PromptExample([user(t)])) for t in ("a b", "c d e", "the fox")]
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, stop_token_ids=tuple(chat.stop_token_ids))
    for seeds in (None, [1, 2, 3]):
        torch.manual_seed(0)
        expected = HFEngine(clean, chat.pad_token_id).generate(prompts, sampling, seeds)
        drawn = set(expected.response_ids[expected.response_mask].tolist()) - set(sampling.stop_token_ids)
        folder = tmp_path / f"processed-{seeds is None}"
        clean.save_pretrained(folder)
        GenerationConfig(  # what a checkpoint may carry; suppressing every drawn token changes every row
            do_sample=True,
            temperature=0.05,
            top_p=0.3,
            top_k=2,
            repetition_penalty=1.3,
            suppress_tokens=sorted(drawn),
        ).save_pretrained(folder)
        processed = load_policy(folder).eval()
        torch.manual_seed(0)
        got = HFEngine(processed, chat.pad_token_id).generate(prompts, sampling, seeds)
        assert torch.equal(got.input_ids, expected.input_ids)
        assert processed.generation_config.suppress_tokens == sorted(drawn)  # the model's own is kept


# -- precision: the reference and RM compute in the actor's dtype (item 8) -------------------------


@pytest.mark.parametrize("bf16", [False, True])
def test_first_rollout_kl_is_zero(phi3_run, tmp_path, bf16):
    policy, rm, prompts = phi3_run
    seen = {}

    def callback(step, metrics):
        seen[step] = metrics

    from segppo.config import PPOConfig

    cfg = PPOConfig(
        policy=policy,
        reward_model=rm,
        prompts=prompts,
        output=str(tmp_path / "run"),
        rollout_batch_size=8,
        micro_rollout_batch_size=4,
        train_batch_size=8,
        micro_train_batch_size=4,
        max_new_tokens=8,
        max_prompt_len=48,  # within the tiny policy's 256 positions
        critic_init="rm",
        ppo_epochs=1,
        warmup_ratio=0.0,
        max_steps=1,
        temperature=0.7,
        bf16=bf16,
        seed=0,
    )
    train_ppo(cfg, step_callback=callback)
    # Sampled at temperature 0.7: policy and reference log-probs at the same temperature, same dtype.
    assert abs(seen[1]["kl"]) < 1e-6 and abs(seen[1]["approx_kl"]) < 1e-6
    assert read_metrics(cfg.output_dir)[0]["kl"] == seen[1]["kl"]


def test_float32_rollouts_score_the_actor_while_sampling(phi3_run, tmp_path, monkeypatch):
    """In float32 the HF engine's own log-probs and entropy replace the actor's scoring pass, and the
    run equals one that recomputes them (bf16 and vLLM recompute: `scores_from_sampling`)."""
    from safetensors.torch import load_file

    import segppo.ppo.rollout as rollout
    import segppo.ppo.trainer as trainer

    policy, rm, prompts = phi3_run
    decides = trainer.scores_from_sampling
    calls = []
    recompute = rollout.sampled_logprobs_and_entropy
    monkeypatch.setattr(
        rollout, "sampled_logprobs_and_entropy", lambda *a, **k: calls.append(1) or recompute(*a, **k)
    )
    args = dict(temperature=0.7, top_p=0.9, max_steps=2, actor_lr=1e-3, critic_lr=1e-3)
    sampled = ppo(policy, rm, prompts, tmp_path / "sampled", **args)
    assert not calls
    monkeypatch.setattr(trainer, "scores_from_sampling", lambda cfg: False)
    recomputed = ppo(policy, rm, prompts, tmp_path / "recomputed", **args)
    assert calls  # 4 micro-rollouts of 2 steps
    for got, want in zip(read_metrics(sampled), read_metrics(recomputed), strict=True):
        for key in ("reward", "kl", "entropy", "policy_loss", "value_loss", "approx_kl", "response_length"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    a = load_file(sampled / "policy" / "model.safetensors")
    b = load_file(recomputed / "policy" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    from segppo.config import PPOConfig

    base = dict(policy="p", reward_model="r", prompts="x", output="o")
    assert decides(PPOConfig(**base))
    assert not decides(PPOConfig(**base, bf16=True))
    assert not decides(PPOConfig(**base, rollout_engine="vllm"))


def test_one_step_epochs_take_the_old_values_from_the_critics_first_pass(phi3_run, tmp_path, monkeypatch):
    """With one critic optimizer step per epoch, the critic's first training forwards give GAE its
    values (`values_in_update`): no scoring pass of the critic, and the run (two epochs, so the
    second one clips against those values) equals one that scores them."""
    from safetensors.torch import load_file

    import segppo.ppo.rollout as rollout
    import segppo.ppo.trainer as trainer

    policy, rm, prompts = phi3_run
    decides = trainer.values_in_update
    calls = []
    scoring_pass = rollout.critic_values
    monkeypatch.setattr(rollout, "critic_values", lambda *a, **k: calls.append(1) or scoring_pass(*a, **k))
    args = dict(max_steps=2, ppo_epochs=2, actor_lr=1e-3, critic_lr=1e-3, temperature=0.7)
    in_update = ppo(policy, rm, prompts, tmp_path / "in_update", **args)
    assert not calls
    monkeypatch.setattr(trainer, "values_in_update", lambda cfg: False)
    scored = ppo(policy, rm, prompts, tmp_path / "scored", **args)
    assert calls  # 2 micro-rollouts of 2 steps
    keys = (
        "reward", "kl", "policy_loss", "value_loss", "value_clipfrac", "approx_kl",
        "explained_variance", "actor_lr", "critic_lr",
    )  # fmt: skip
    for got, want in zip(read_metrics(in_update), read_metrics(scored), strict=True):
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    a = load_file(in_update / "policy" / "model.safetensors")
    b = load_file(scored / "policy" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    from segppo.config import PPOConfig

    base = dict(policy="p", reward_model="r", prompts="x", output="o", rollout_batch_size=8)
    assert decides(PPOConfig(**base, train_batch_size=8))
    assert not decides(PPOConfig(**base, train_batch_size=4))  # the second step's values are newer
    assert not decides(PPOConfig(**base, train_batch_size=8, advantage="reinforce++"))  # no critic


def test_one_step_epochs_plan_the_update_once_per_step(phi3_run, tmp_path, monkeypatch):
    """With one optimizer step per epoch (`values_in_update`), the critic's first epoch and the
    update share the step's plan: its rows' order and the denominators' all_reduce run once a step."""
    import segppo.ppo.trainer as trainer

    policy, rm, prompts = phi3_run
    calls = []
    plan = trainer.PPOTrainer.update_plan
    monkeypatch.setattr(
        trainer.PPOTrainer, "update_plan", lambda self, *a: calls.append(a[1]) or plan(self, *a)
    )
    ppo(policy, rm, prompts, tmp_path / "run", max_steps=2, ppo_epochs=2)  # train_batch_size = rollout
    assert calls == [0, 1]


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_bf16_trains_with_float32_master_weights(tiny_lm_dir, zero_stage):
    from segppo.config import PPOConfig
    from segppo.distributed import init_distributed, shutdown
    from segppo.optim import training_engine

    cfg = PPOConfig(policy=tiny_lm_dir, reward_model=tiny_lm_dir, prompts="x", output="unused", bf16=True)
    cfg.zero_stage = zero_stage
    init_distributed()
    try:
        engine, _ = training_engine(
            load_policy(tiny_lm_dir), lr=1e-3, total_steps=2, micro_batch_size=1, grad_accum=1, config=cfg
        )
        assert next(engine.module.parameters()).dtype == torch.bfloat16  # computes in bf16
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the AdamW DeepSpeed wraps
        stepped = [p for group in inner.param_groups for p in group["params"]]
        assert stepped and all(p.dtype == torch.float32 for p in stepped)  # float32 master weights
        ids = torch.tensor([[5, 6, 7, 8]])
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    finally:
        shutdown()


# -- KL target per token, reference tokenizer, sampling recorded (items 9, 13) ----------------------


def test_kl_target_is_per_token_and_sampling_is_recorded(phi3_run, tmp_path):
    from segppo.ppo.losses import KLController

    policy, rm, prompts = phi3_run
    target = 0.05
    out = ppo(
        policy,
        rm,
        prompts,
        tmp_path / "run",
        max_steps=3,
        num_episodes=2,
        kl_target=target,
        kl_coef=0.05,
        actor_lr=1e-2,
        kl_estimator="k3",
    )
    rows = read_metrics(out)
    per_token, per_sequence = KLController(0.05, target, 10000), KLController(0.05, target, 10000)
    for row in rows:
        assert row["kl_per_token"] == pytest.approx(row["kl"] / row["response_length"], rel=1e-6, abs=1e-12)
        assert row["kl_coef"] == pytest.approx(per_token.coef)  # the controller reads the per-token KL
        per_token.update(row["kl_per_token"], int(row["responses"]))
        per_sequence.update(row["kl"], int(row["responses"]))
    assert per_token.coef != pytest.approx(per_sequence.coef)  # the run tells the two apart
    sampling = json.loads((out / "run_config.json").read_text())["sampling"]
    assert sampling["temperature"] == 1.0 and sampling["top_k"] is None
    assert sampling["checkpoint_generation_config"] == "not applied"
    assert sampling["stop_token_ids"] == SegppoMetadata.load(out / "policy" / "segppo.json").stop_token_ids


def test_reference_with_another_tokenizer_is_refused(phi3_run, tiny_lm_dir, tmp_path):
    policy, rm, prompts = phi3_run
    with pytest.raises(ValueError, match="--reference .* uses a different tokenizer from the policy"):
        ppo(policy, rm, prompts, tmp_path / "run", reference=tiny_lm_dir)


def test_ppo_renders_prompts_with_the_rms_template_kwargs_and_refuses_others(tmp_path):
    """With a shared tokenizer the policy's prompts are rendered as the RM's training prompts were:
    its recorded template variables (Qwen3's enable_thinking=false), and no others."""
    from types import SimpleNamespace

    from test_chat_templates import NO_THINKING, qwen3

    from segppo.config import PPOConfig
    from segppo.ppo.setup import load_prompts, policy_chat_format, resolve_chat_template_kwargs

    meta = SegppoMetadata(
        kind="reward_model",
        granularity="bandit",
        **ChatFormat(qwen3(), template_kwargs=NO_THINKING).metadata_fields(),
    )
    reward = SimpleNamespace(metadata=meta, shares_tokenizer=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a prime."}\n')
    cfg = PPOConfig(policy="p", reward_model="r", prompts=str(prompts), output="o", max_prompt_len=64)
    chat = policy_chat_format(reward, qwen3(), None, resolve_chat_template_kwargs(cfg, reward))
    (prompt,) = load_prompts(cfg, chat)
    assert chat.tokenizer.decode(prompt.prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    given = PPOConfig(**{**vars(cfg), "chat_template_kwargs": NO_THINKING})
    assert resolve_chat_template_kwargs(given, reward) == NO_THINKING
    other = PPOConfig(**{**vars(cfg), "chat_template_kwargs": '{"enable_thinking": true}'})
    with pytest.raises(
        ValueError,
        match=r'^--chat-template-kwargs \{"enable_thinking": true\} differ from the ones the reward model '
        r'was trained with \(\{"enable_thinking": false\}, segppo.json\)',
    ):
        resolve_chat_template_kwargs(other, reward)
    # A foreign bandit RM reads text in its own format: the policy's variables are the option's.
    assert resolve_chat_template_kwargs(other, SimpleNamespace(metadata=meta, shares_tokenizer=False)) == {
        "enable_thinking": True
    }
