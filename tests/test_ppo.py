"""PPO end to end on tiny models (CPU, DeepSpeed with gloo), and the fixes of DESIGN.md §3.6."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from stopping import stop_at_step
from tiny import tiny_rm_config
from transformers import AutoModelForCausalLM

from segppo.config import PPOConfig
from segppo.data import ChatFormat, PreferenceExample, PromptExample
from segppo.generation import SamplingConfig, generate
from segppo.models import SegppoMetadata, load_tokenizer
from segppo.ppo.trainer import NonFiniteError, train_ppo
from segppo.rm.scoring import load_scorer
from segppo.rm.trainer import train_reward_model
from segppo.tracking import read_metrics

PROMPTS = ["Name the capital.", "What is the capital of France?", "Say a city.", "Which city?"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": p} for p in PROMPTS * 40]
    rows.append(
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A city?"}]}
    )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def reward_models(tiny_lm_dir, preferences_file, tmp_path_factory):
    """A trained segment, token and bandit RM on the same tiny backbone."""
    folders = {}
    for granularity in ("segment", "token", "bandit"):
        out = tmp_path_factory.mktemp(f"rm_{granularity}") / "run"
        cfg = tiny_rm_config(tiny_lm_dir, preferences_file, out, granularity=granularity, max_steps=20)
        train_reward_model(cfg)
        folders[granularity] = str(out)
    return folders


def ppo_config(policy, reward_model, prompts, output, **overrides) -> PPOConfig:
    values = dict(
        policy=policy,
        reward_model=reward_model,
        prompts=prompts,
        output=str(output),
        rollout_batch_size=16,
        micro_rollout_batch_size=8,
        train_batch_size=16,
        micro_train_batch_size=8,
        max_new_tokens=12,
        max_prompt_len=48,
        actor_lr=1e-2,
        critic_lr=1e-2,
        critic_init="sft",
        ppo_epochs=2,
        zero_stage=0,
        warmup_ratio=0.0,
        max_steps=2,
        seed=0,
    )
    values.update(overrides)
    return PPOConfig(**values)


def fresh_rollout_reward(policy_dir: str, rm_dir: str, n: int = 64, seed: int = 123) -> float:
    """Mean RM score of new samples from `policy_dir`, on held-fixed prompts and sampling seed."""
    scorer = load_scorer(rm_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    prompts = [scorer.chat.encode_prompt(PromptExample([{"role": "user", "content": p}])) for p in PROMPTS]
    prompts = (prompts * n)[:n]
    sampling = SamplingConfig(max_new_tokens=12, stop_token_ids=tuple(scorer.chat.stop_token_ids))
    torch.manual_seed(seed)
    batch = generate(policy, prompts, sampling, scorer.tokenizer.pad_token_id, "cpu")
    return scorer.score(batch).scores.mean().item()


@pytest.mark.parametrize("granularity", ["segment", "token", "bandit"])
def test_twenty_steps_raise_the_reward_of_fresh_rollouts(
    tiny_lm_dir, reward_models, prompts_file, tmp_path, granularity
):
    rm = reward_models[granularity]
    cfg = ppo_config(
        tiny_lm_dir, rm, prompts_file, tmp_path / "ppo", max_steps=20, num_episodes=2, normalize=False
    )
    policy_dir = train_ppo(cfg)
    before = fresh_rollout_reward(tiny_lm_dir, rm)
    after = fresh_rollout_reward(str(policy_dir), rm)
    assert after > before + 0.5, (before, after)
    metrics = read_metrics(cfg.output_dir, split="train")
    assert len(metrics) == 20
    for key in (
        "reward",
        "normalized_reward",
        "kl",
        "entropy",
        "response_length",
        "segments",
        "segment_length",
        "policy_loss",
        "value_loss",
        "policy_clipfrac",
        "value_clipfrac",
        "approx_kl",
        "explained_variance",
        "tokens_per_s",
        "time_generation",
        "time_scoring",
        "time_training",
    ):
        assert key in metrics[-1], key
    if granularity == "token":
        assert metrics[0]["segment_length"] == pytest.approx(1.0, abs=0.1)
    if granularity == "bandit":
        assert metrics[0]["segments"] == 1.0


def test_policy_checkpoint_and_samples(tiny_lm_dir, reward_models, prompts_file, tmp_path, monkeypatch):
    # Given as relative paths: the policy's segppo.json must name them from any working directory.
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(p) for p in (tiny_lm_dir, reward_models["segment"], prompts_file)]
    cfg = ppo_config(*relative, tmp_path / "run", save_every=1)
    train_ppo(cfg)
    model = AutoModelForCausalLM.from_pretrained(cfg.output_dir / "policy")
    assert model.config.vocab_size == 384
    assert (cfg.output_dir / "checkpoints" / "step-1" / "model.safetensors").exists()
    meta = SegppoMetadata.load(cfg.output_dir / "policy" / "segppo.json")
    assert meta.kind == "policy" and meta.granularity == "segment"
    assert meta.base_model == meta.segmenter == str(Path(tiny_lm_dir).resolve())
    assert meta.data["prompts"] == str(Path(prompts_file).resolve())
    assert meta.data["reward_model"] == str(Path(reward_models["segment"]).resolve())
    assert meta.data["steps"] == 2
    checkpoint = SegppoMetadata.load(cfg.output_dir / "checkpoints" / "step-1" / "segppo.json")
    assert checkpoint.data["steps"] == 1  # the steps that checkpoint has had, not the run's total
    samples = [json.loads(line) for line in (cfg.output_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2}
    sample = samples[0]
    assert "".join(seg["text"] for seg in sample["segments"]) in sample["response"]
    assert sample["segments"] and all("reward" in seg for seg in sample["segments"])


def test_two_ranks_match_one_rank(tiny_lm_dir, reward_models, prompts_file, tmp_path):
    one = ppo_config(
        tiny_lm_dir,
        reward_models["segment"],
        prompts_file,
        tmp_path / "one",
        max_steps=1,
        ppo_epochs=1,
        zero_stage=2,
    )
    two = dataclasses.replace(one, output=str(tmp_path / "two"), nproc=2)
    train_ppo(one)
    train_ppo(two)
    a, b = read_metrics(one.output_dir, split="train")[0], read_metrics(two.output_dir, split="train")[0]
    for key in (
        "reward",
        "normalized_reward",
        "kl",
        "response_length",
        "policy_loss",
        "value_loss",
        "entropy",
    ):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    wa = load_file(one.output_dir / "policy" / "model.safetensors")
    wb = load_file(two.output_dir / "policy" / "model.safetensors")
    for name in wa:
        # Adam divides by sqrt(v): a gradient element near 0, summed in another order on 2 ranks,
        # moves its weight by up to ~5e-5 (one of 12288 LM-head elements on the plain head path);
        # a rank-dependent error would move many weights by ~lr = 1e-2.
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-4)


def test_resume_matches_an_uninterrupted_run(tiny_lm_dir, reward_models, prompts_file, tmp_path):
    base = dict(max_steps=4, save_every=2, kl_target=0.1)  # adaptive KL: its state must resume too
    straight = ppo_config(tiny_lm_dir, reward_models["segment"], prompts_file, tmp_path / "straight", **base)
    train_ppo(straight)
    broken = ppo_config(tiny_lm_dir, reward_models["segment"], prompts_file, tmp_path / "broken", **base)

    stop_at_step(train_ppo, broken, 3)
    train_ppo(dataclasses.replace(broken, resume=True))
    want, got = read_metrics(straight.output_dir), read_metrics(broken.output_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for w, g in zip(want, got, strict=True):
        for key in ("reward", "kl", "kl_coef", "policy_loss", "value_loss", "actor_lr"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (w["step"], key)
    wa = load_file(straight.output_dir / "policy" / "model.safetensors")
    wb = load_file(broken.output_dir / "policy" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6)


def test_a_one_rank_zero2_state_of_an_older_segppo_resumes(
    tiny_lm_dir, reward_models, prompts_file, tmp_path, monkeypatch
):
    """A PPO state an earlier segppo saved under ZeRO-2 on one rank (its partitioned optimizer files)
    resumes into the engines it was saved by and ends as an unbroken run (tests/test_rm.py has the RM's)."""
    import segppo.optim

    base = dict(max_steps=4, save_every=2, zero_stage=2)
    straight = ppo_config(tiny_lm_dir, reward_models["bandit"], prompts_file, tmp_path / "straight", **base)
    train_ppo(straight)
    old = ppo_config(tiny_lm_dir, reward_models["bandit"], prompts_file, tmp_path / "old", **base)

    with monkeypatch.context() as m:
        m.setattr(segppo.optim, "one_rank_zero_stage", lambda stage, **_: stage)
        stop_at_step(train_ppo, old, 3)
    assert list((old.output_dir / "state").glob("*/actor/state/zero_pp_rank_0_*optim_states.pt"))
    train_ppo(dataclasses.replace(old, resume=True))
    want, got = read_metrics(straight.output_dir), read_metrics(old.output_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    # ZeRO-2's flat buffers round differently from stage 0, and Adam divides each gradient by its
    # running RMS, so an element whose gradient is near 0 carries that rounding into its weight:
    # up to 2e-6 after these 4 steps (2e-7 when actor and critic updates interleaved; 3.2e-5 in one
    # of 12288 head weights since the prompts' shared prefix runs once, which rounds differently
    # again), and the losses differ by about 1e-5 relative (1.01e-5 at step 2, before any resume).
    # A resume that lost its optimizer state would differ by orders of magnitude more.
    for w, g in zip(want, got, strict=True):
        for key in ("reward", "policy_loss", "value_loss"):
            assert g[key] == pytest.approx(w[key], rel=5e-5, abs=1e-7), (w["step"], key)
    wa = load_file(straight.output_dir / "policy" / "model.safetensors")
    wb = load_file(old.output_dir / "policy" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=5e-5)


def test_a_resume_keeps_the_options_that_decide_the_saved_models(
    tiny_lm_dir, reward_models, prompts_file, tmp_path
):
    """A state holds the models its run built: a critic or not (--advantage), LoRA adapters or not
    (--lora-rank, --lora-targets). A resume that changes them is refused in one line naming the
    run's value, not left to fail inside DeepSpeed's load (an AssertionError, a state-dict error)."""
    run = ppo_config(
        tiny_lm_dir,
        reward_models["bandit"],
        prompts_file,
        tmp_path / "run",
        max_steps=1,
        advantage="rloo",
        n_samples_per_prompt=2,
        ppo_epochs=1,
    )
    train_ppo(run)
    more = dataclasses.replace(run, resume=True, max_steps=2)
    with pytest.raises(ValueError, match="started with --advantage rloo"):
        train_ppo(dataclasses.replace(more, advantage="gae"))
    with pytest.raises(ValueError, match="started with --lora-rank 0"):
        train_ppo(dataclasses.replace(more, lora_rank=4))
    # A step's prompts are found from the step number, the prompt order (--seed) and the rollout
    # size: other values would silently repeat some prompts and skip others.
    with pytest.raises(
        ValueError, match="^--resume with --rollout-batch-size 8, but the run was started with 16"
    ):
        train_ppo(dataclasses.replace(more, rollout_batch_size=8, train_batch_size=8))
    with pytest.raises(ValueError, match="^--resume with --seed 1, but the run was started with 0"):
        train_ppo(dataclasses.replace(more, seed=1))
    train_ppo(dataclasses.replace(more, advantage="grpo"))  # critic-free either way: it resumes
    assert [r["step"] for r in read_metrics(run.output_dir)] == [1, 2]


def test_run_config_records_the_chat_format_the_run_rendered_with(
    tiny_lm_dir, preferences_file, prompts_file, tmp_path
):
    """Without --chat-template(-kwargs) PPO renders prompts with the RM's recorded template and
    variables; run_config.json recorded the options (null), not what the run used. A resume with the
    same command line still resumes, and the record stays the same."""
    from tiny import CHATML_TEMPLATE

    switch = (
        "{% if enable_thinking is defined and enable_thinking is false %}"
        "{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    )
    template = CHATML_TEMPLATE.replace("{% endif %}", switch + "{% endif %}")
    no_thinking = {"enable_thinking": False}
    rm = tmp_path / "rm"
    train_reward_model(
        tiny_rm_config(
            tiny_lm_dir,
            preferences_file,
            rm,
            granularity="bandit",
            max_steps=1,
            max_samples=40,
            chat_template=template,
            chat_template_kwargs=no_thinking,
        )
    )
    run = ppo_config(
        tiny_lm_dir, str(rm), prompts_file, tmp_path / "ppo", max_steps=1, max_prompt_len=64, ppo_epochs=1
    )
    assert run.chat_template is None and run.chat_template_kwargs is None
    train_ppo(run)
    recorded = json.loads((run.output_dir / "run_config.json").read_text())
    assert recorded["chat_template"] == template
    assert recorded["chat_template_kwargs"] == no_thinking
    train_ppo(dataclasses.replace(run, resume=True, max_steps=2))  # the same command line resumes
    assert [r["step"] for r in read_metrics(run.output_dir)] == [1, 2]
    resumed = json.loads((run.output_dir / "run_config.json").read_text())
    assert (resumed["chat_template"], resumed["chat_template_kwargs"]) == (template, no_thinking)


def test_the_segmenter_warning_compares_local_folders_by_what_they_hold(
    tiny_lm_dir, reward_models, prompts_file, tmp_path, capsys
):
    """The segment RM was segmented with tiny_lm_dir (its segppo.json); PPO warned that segments may
    differ when the reference was the same model in another folder (a copy). Another model still warns."""
    from tiny import save_tiny_lm

    from segppo.ppo.setup import load_reward, warn_on_segmenter_mismatch

    copy = tmp_path / "copy"
    shutil.copytree(tiny_lm_dir, copy)
    other = save_tiny_lm(tmp_path / "other", seed=1)  # the same shapes, other weights
    warned = {}
    for name, reference in (("same", tiny_lm_dir), ("copy", str(copy)), ("other", other)):
        cfg = ppo_config(
            tiny_lm_dir, reward_models["segment"], prompts_file, tmp_path / "run", reference=reference
        )
        warn_on_segmenter_mismatch(cfg, load_reward(cfg, load_tokenizer(tiny_lm_dir)))
        warned[name] = "was segmented with" in " ".join(capsys.readouterr().err.split())
    assert warned == {"same": False, "copy": False, "other": True}


# -- DESIGN.md §3.6: defects of the paper's code ----------------------------------------------


def test_each_row_keeps_its_own_eos(tiny_lm_dir):
    from segppo.generation import cut_at_stop

    eos, pad = 3, 0
    generated = torch.tensor([[5, 6, eos, pad, pad], [7, 8, 9, 10, 11], [eos, pad, pad, pad, pad]])
    responses, has_eos = cut_at_stop(generated, [eos])
    assert responses == [[5, 6, eos], [7, 8, 9, 10, 11], [eos]]
    assert has_eos == [True, False, True]
    from segppo.data import collate_responses

    batch = collate_responses([[1, 2], [1], [1, 2, 4]], responses, has_eos, pad)
    assert batch.response_mask.sum(-1).tolist() == [3, 5, 1]
    assert batch.attention_mask.sum(-1).tolist() == [5, 6, 4]
    assert batch.has_eos.tolist() == [True, False, True]


def test_rm_reads_ppo_responses_as_it_read_its_training_data(reward_models):
    """The same prompt and response text give the same token ids and the same RM score."""
    from segppo.data import collate_preferences, collate_responses
    from segppo.ppo.rollout import shared_rm_values

    rm_dir = reward_models["segment"]
    scorer = load_scorer(rm_dir)
    messages = [{"role": "user", "content": "Name the capital."}]
    pair = scorer.chat.encode_pair(PreferenceExample(messages, "the fox Paris red", "x"), max_len=64)
    # PPO's path: the policy's chat format (the RM's recorded template) and generated ids + EOS.
    policy_tokenizer = load_tokenizer(SegppoMetadata.load(f"{rm_dir}/model/segppo.json").base_model)
    chat = ChatFormat(policy_tokenizer, scorer.metadata.chat_template)
    prompt_ids = chat.encode_prompt(PromptExample(messages)).prompt_ids
    generated = policy_tokenizer.encode("the fox Paris red", add_special_tokens=False) + [chat.end_of_turn_id]
    assert prompt_ids == pair.prompt_ids and generated == pair.chosen_ids
    ppo_batch = collate_responses([prompt_ids], [generated], [True], policy_tokenizer.pad_token_id)
    rm_batch = collate_preferences([pair], policy_tokenizer.pad_token_id)
    ppo_values = shared_rm_values(scorer.model)(ppo_batch)
    rm_values = scorer.score(rm_batch).rm_values[:1, : ppo_values.shape[1]]
    torch.testing.assert_close(ppo_values, rm_values)


def test_penalties_are_options_in_response_coordinates():
    from segppo.ppo.losses import token_rewards

    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]).bool()
    has_eos = torch.tensor([True, False, False])
    zeros = torch.zeros(3, 5)
    rewards = token_rewards(
        zeros,
        zeros,
        mask,
        has_eos,
        kl_coef=0.1,
        reward_clip=10.0,
        missing_eos_penalty=-1.0,
        overlong_penalty=-0.5,
        max_response_len=4,
    )
    # row 0: EOS, 3 tokens; row 1: no EOS and 5 > 4 tokens; row 2: no EOS, exactly 4 tokens
    assert rewards[0].tolist() == [0, 0, 0, 0, 0]
    assert rewards[1].tolist() == [0, 0, 0, 0, -1.5]
    assert rewards[2].tolist() == [0, 0, 0, -1.0, 0]
    plain = token_rewards(zeros, zeros, mask, has_eos, kl_coef=0.1, reward_clip=10.0)
    assert plain.abs().sum() == 0  # no penalty unless asked for, whatever the run is called


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(overlong_penalty=-1.0), "--overlong-penalty needs --max-response-len"),
        (dict(max_response_len=32), "--max-response-len needs --overlong-penalty"),
        (
            dict(overlong_penalty=-1.0, max_response_len=64, max_new_tokens=64),
            "--max-response-len 64 is not below --max-new-tokens 64",
        ),
    ],
)
def test_an_overlong_penalty_that_could_never_apply_is_refused(options, message):
    """Without its penalty, --max-response-len did nothing; at or above --max-new-tokens no response
    is longer than it, so the penalty never applied. Both ran silently as if unasked."""
    with pytest.raises(ValueError, match=message):
        PPOConfig(policy="p", reward_model="r", prompts="x", output="o", **options)
    PPOConfig(
        policy="p", reward_model="r", prompts="x", output="o", overlong_penalty=-1.0, max_response_len=48
    )


def test_dense_rewards_are_clipped_and_kl_penalised():
    from segppo.ppo.losses import kl_penalty, token_rewards

    mask = torch.ones(1, 3, dtype=torch.bool)
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    kl = kl_penalty(logp, ref, "k1")
    out = token_rewards(
        torch.tensor([[20.0, -20.0, 1.0]]), kl, mask, torch.tensor([True]), kl_coef=0.1, reward_clip=10.0
    )
    torch.testing.assert_close(out, torch.tensor([[10.0 - 0.05, -10.0 + 0.1, 1.0]]))
    k3 = kl_penalty(logp, ref, "k3")
    assert (k3 >= 0).all() and k3[0, 2] == 0


# -- bad input ---------------------------------------------------------------------------------


def test_prompt_longer_than_the_limit(tiny_lm_dir, reward_models, tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "word " * 200}) + "\n" + json.dumps({"prompt": "short"}) + "\n")
    with pytest.raises(ValueError, match="more than --max-prompt-len 48"):
        train_ppo(ppo_config(tiny_lm_dir, reward_models["segment"], str(prompts), tmp_path / "o"))


def test_an_unknown_long_prompts_choice_is_refused_with_the_options():
    """Checked with the other choices, as eval's config does: it failed only after the reward model
    had loaded, naming the library's `on_long_prompt` instead of the option."""
    with pytest.raises(ValueError, match="--long-prompts must be one of"):
        PPOConfig(policy="p", reward_model="r", prompts="x", output="o", long_prompts="cut")


@pytest.mark.parametrize("std", [0.0, -1.0])
def test_a_reward_std_that_is_not_positive_is_refused(std):
    """σ(p) = max(std, σ_floor): --reward-std 0 or -1 ran with σ = 1e-2, every reward ×100, silently."""
    from segppo.config import EvalConfig

    with pytest.raises(ValueError, match="--reward-std must be positive"):
        PPOConfig(policy="p", reward_model="r", prompts="x", output="o", reward_mean=0.0, reward_std=std)
    with pytest.raises(ValueError, match="--reward-std must be positive"):
        EvalConfig(policy=["p"], prompts="x", output="o", reward_mean=0.0, reward_std=std)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(kl_target=0.0), "--kl-target must be positive"),
        (dict(kl_target=-0.1), "--kl-target must be positive"),
        (dict(kl_target=0.1, kl_horizon=0), "--kl-horizon must be a positive integer"),
        (dict(kl_target=0.1, kl_coef=0.0), "--kl-target needs a positive --kl-coef"),
    ],
)
def test_adaptive_kl_options_that_cannot_work_are_refused(options, message):
    """The controller divides by --kl-target and --kl-horizon (a ZeroDivisionError traceback after
    the whole first step) and multiplies β: from --kl-coef 0 it never leaves 0, silently."""
    with pytest.raises(ValueError, match=message):
        PPOConfig(policy="p", reward_model="r", prompts="x", output="o", **options)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_a_temperature_that_is_not_positive_is_refused_saying_why(temperature):
    """PPO takes log-probs, ratios and KL at its sampling temperature; greedy decoding (temperature
    0, which `segppo eval` accepts) has none, so PPO keeps refusing it, and says why."""
    with pytest.raises(ValueError, match=r"--temperature must be positive, got .*: PPO takes its log-probs"):
        PPOConfig(policy="p", reward_model="r", prompts="x", output="o", temperature=temperature)


def test_an_entropy_threshold_that_would_segment_nothing_is_refused(tiny_lm_dir, reward_models, tmp_path):
    """--entropy-threshold sets where segment-level rewards cut; with a bandit RM (or
    --reward-granularity token|bandit) nothing is segmented, and the run went on without it."""
    bandit, segment = reward_models["bandit"], reward_models["segment"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 4))
    for rm, extra in ((bandit, {}), (segment, {"reward_granularity": "token"})):
        cfg = ppo_config(tiny_lm_dir, rm, str(prompts), tmp_path / "o", entropy_threshold=2.0, **extra)
        with pytest.raises(ValueError, match="--entropy-threshold 2.0 .* --reward-granularity segment"):
            train_ppo(cfg)


def test_empty_prompt_set(tiny_lm_dir, reward_models, tmp_path):
    prompts = tmp_path / "empty.jsonl"
    prompts.write_text(json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(ValueError):
        train_ppo(ppo_config(tiny_lm_dir, reward_models["segment"], str(prompts), tmp_path / "o"))


def test_fewer_prompts_than_a_rollout_batch(tiny_lm_dir, reward_models, tmp_path):
    prompts = tmp_path / "few.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    with pytest.raises(ValueError, match="fewer than one --rollout-batch-size"):
        train_ppo(ppo_config(tiny_lm_dir, reward_models["segment"], str(prompts), tmp_path / "o"))


@pytest.fixture(scope="module")
def other_tokenizer_lm(tmp_path_factory):
    """A tiny LM whose tokenizer differs from the policy's (another BPE vocabulary)."""
    from tiny import tiny_config, tiny_tokenizer

    folder = tmp_path_factory.mktemp("other_lm")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(tiny_config("gpt2", vocab_size=300)).save_pretrained(folder)
    tiny_tokenizer(vocab_size=300).save_pretrained(folder)
    return str(folder)


def test_dense_rm_with_another_tokenizer_is_refused(
    tiny_lm_dir, other_tokenizer_lm, preferences_file, prompts_file, tmp_path
):
    rm = tmp_path / "rm"
    train_reward_model(
        tiny_rm_config(other_tokenizer_lm, preferences_file, rm, granularity="token", max_steps=1)
    )
    with pytest.raises(ValueError, match="different tokenizer"):
        train_ppo(ppo_config(tiny_lm_dir, str(rm), prompts_file, tmp_path / "o"))


def test_bandit_rm_with_another_tokenizer_scores_decoded_text(
    tiny_lm_dir, other_tokenizer_lm, preferences_file, prompts_file, tmp_path
):
    rm = tmp_path / "rm"
    train_reward_model(
        tiny_rm_config(other_tokenizer_lm, preferences_file, rm, granularity="bandit", max_steps=5, lr=3e-3)
    )
    with pytest.raises(ValueError, match="critic-init rm"):
        train_ppo(ppo_config(tiny_lm_dir, str(rm), prompts_file, tmp_path / "a", critic_init="rm"))
    cfg = ppo_config(tiny_lm_dir, str(rm), prompts_file, tmp_path / "b", max_steps=1)
    train_ppo(cfg)
    row = read_metrics(cfg.output_dir, split="train")[0]
    assert row["segments"] == 1.0 and row["reward"] != 0.0


def test_non_finite_rewards_stop_after_saving_the_last_good_state(
    tiny_lm_dir, reward_models, prompts_file, tmp_path
):
    broken_rm = tmp_path / "broken_rm"
    shutil.copytree(f"{reward_models['token']}/model", broken_rm)
    weights = load_file(broken_rm / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, broken_rm / "model.safetensors", metadata={"format": "pt"})
    cfg = ppo_config(tiny_lm_dir, str(broken_rm), prompts_file, tmp_path / "run")
    with pytest.raises(NonFiniteError, match="not finite"):
        train_ppo(cfg)
    assert (cfg.output_dir / "state" / "latest").read_text().strip() == "step-0"


@pytest.mark.smoke
def test_ppo_cli(tiny_lm_dir, reward_models, prompts_file, tmp_path):
    from segppo.cli.main import app
    from typer.testing import CliRunner

    out = tmp_path / "cli"
    args = [
        "ppo",
        "train",
        "--policy",
        tiny_lm_dir,
        "--reward-model",
        reward_models["bandit"],
        "--prompts",
        prompts_file,
        "--output",
        str(out),
        "--rollout-batch-size",
        "16",
        "--micro-rollout-batch-size",
        "8",
        "--train-batch-size",
        "16",
        "--micro-train-batch-size",
        "8",
        "--max-new-tokens",
        "8",
        "--max-prompt-len",
        "48",
        "--max-steps",
        "1",
        "--zero-stage",
        "0",
        "--missing-eos-penalty",
        "-1",
    ]
    result = CliRunner().invoke(app, args, env={"SEGPPO_PROGRESS_INTERVAL": "0"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run_config.json").read_text())["missing_eos_penalty"] == -1.0
    # off a terminal: one-line progress records, the last with the step's reward and throughput
    from test_progress import records

    last = records(result.output, "ppo")[-1]
    assert (last["done"], last["total"], last["eta"]) == ("1", "1", "0:00:00"), result.output
    assert "reward" in last["metrics"] and float(last["rate"]) > 0
    result = CliRunner().invoke(app, ["ppo", "train", "--preset", "nope", "--output", "x"])
    assert result.exit_code == 2


def test_ppo_reads_a_normalizer_json(tiny_lm_dir, reward_models, prompts_file, tmp_path):
    """`--normalizer normalizer.json` (what fit-normalizer writes) sets PPO's segment rewards."""
    from segppo.normalizer import Normalizer

    path = tmp_path / "normalizer.json"
    Normalizer(params=(0.5, 0.1, 1.0, 2.0), sigma_floor=0.05, source="fit").save(path)
    plain = ppo_config(
        tiny_lm_dir, reward_models["segment"], prompts_file, tmp_path / "raw", max_steps=1, normalize=False
    )
    normed = dataclasses.replace(plain, output=str(tmp_path / "normed"), normalize=True, normalizer=str(path))
    train_ppo(plain)
    train_ppo(normed)
    meta = SegppoMetadata.load(normed.output_dir / "policy" / "segppo.json")
    assert meta.normalizer == {"params": [0.5, 0.1, 1.0, 2.0], "sigma_floor": 0.05}  # the file's floor
    raw, norm = (read_metrics(c.output_dir, split="train")[0] for c in (plain, normed))
    assert raw["reward"] == pytest.approx(norm["reward"])  # same rollouts, same RM scores
    assert raw["normalized_reward"] != pytest.approx(norm["normalized_reward"])


# -- regrouping a rollout into training micro-batches -----------------------------------------


def test_micro_batches_of_the_pool_are_what_collate_gives_those_rows():
    """Rows regrouped from micro-rollouts of other widths: the layout `collate_responses` gives them."""
    from segppo.data import collate_responses
    from segppo.ppo.rollout import Experience
    from segppo.ppo.samples import TRAINING_TENSORS, RolloutPool

    pad = 0
    generator = torch.Generator().manual_seed(0)
    rows, experiences = [], []
    for prompts, responses in (
        ([[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]]),
        ([[15, 16, 17, 18, 19]], [[20]]),
        ([[21, 22], [23, 24, 25]], [[26, 27, 28], [29, 30]]),
    ):
        batch = collate_responses(prompts, responses, [len(r) % 2 == 0 for r in responses], pad)
        shape = batch.response_mask.shape
        # values past each response are not 0 here, as the scoring passes leave them
        tensors = {name: torch.randn(shape, generator=generator) for name in TRAINING_TENSORS}
        experiences.append(
            Experience(
                batch,
                ref_logprobs=None,
                ref_entropy=None,
                policy_entropy=None,
                rm_values=None,
                **tensors,
            )
        )
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            rows.append(
                (p, r, len(r) % 2 == 0, {name: tensors[name][i, : len(r)] for name in TRAINING_TENSORS})
            )
    pool = RolloutPool.of(experiences, pad)
    assert len(pool) == 5 and pool.tokens([0, 2]) == 3
    for chosen in ([0], [2, 1], [4, 0, 3], [1, 2, 3, 4, 0]):
        batch, tensors = pool.micro_batch(chosen)
        want = collate_responses(
            [rows[i][0] for i in chosen], [rows[i][1] for i in chosen], [rows[i][2] for i in chosen], pad
        )
        for field in ("input_ids", "attention_mask", "position_ids", "response_mask", "has_eos"):
            assert torch.equal(getattr(batch, field), getattr(want, field)), (chosen, field)
        assert batch.prompt_len == want.prompt_len
        for name in TRAINING_TENSORS:
            expected = torch.zeros(want.response_mask.shape)
            for k, i in enumerate(chosen):
                expected[k, : len(rows[i][1])] = rows[i][3][name]
            assert torch.equal(tensors[name], expected), (chosen, name)


def test_non_finite_rewards_on_one_rank_stop_both_and_resume_continues(tiny_lm_dir, reward_models, tmp_path):
    """Only rank 1 sees NaN rewards (at step 2): the check is collective, so both ranks save the state
    after step 1 as `step-1` and stop at once with one error; a resume with the RM repaired ends
    as a run that never broke."""
    import signal
    import time

    tokenizer = load_tokenizer(tiny_lm_dir)
    poison = "Zebra quokka?"
    known = {i for p in PROMPTS for i in tokenizer.encode(p)}
    poison_ids = sorted(set(tokenizer.encode(poison)) - known - set(tokenizer.all_special_ids))
    assert poison_ids
    # 32 prompts, 16 per step, 8 per micro-rollout: micro-rollout j of a step runs on rank j mod 2.
    # Rank 1's prompts of the second step (of episode 0's order) get the poison word.
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0)).tolist()
    rank1_step2 = set(order[24:32])
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": poison if i in rank1_step2 else PROMPTS[i % 4]} for i in range(32)]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # The policy never generates the poison, so only prompts bring it in: its output rows for the
    # poison ids are 0 and every other row is scaled up, so the poison's logit (0) sits far below the
    # top logit. (A checkpoint's generation config no longer applies at sampling, so `suppress_tokens`
    # cannot do this.)
    policy = tmp_path / "policy"
    shutil.copytree(tiny_lm_dir, policy)
    weights = load_file(policy / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 200.0
    weights["lm_head.weight"][poison_ids] = 0.0
    save_file(weights, policy / "model.safetensors", metadata={"format": "pt"})
    rm = tmp_path / "rm"
    shutil.copytree(f"{reward_models['token']}/model", rm)
    good = load_file(rm / "model.safetensors")
    bad = dict(good)
    name = next(k for k in good if k.endswith("embed_tokens.weight"))
    bad[name] = good[name].clone()
    bad[name][poison_ids] = float("nan")  # NaN RM values only on rows holding the poison word
    save_file(bad, rm / "model.safetensors", metadata={"format": "pt"})

    base = dict(max_steps=2, nproc=2, zero_stage=2, num_logged_samples=0)
    straight_rm = tmp_path / "straight_rm"
    shutil.copytree(rm, straight_rm)
    save_file(good, straight_rm / "model.safetensors", metadata={"format": "pt"})
    straight = ppo_config(str(policy), str(straight_rm), str(prompts), tmp_path / "straight", **base)
    broken = ppo_config(str(policy), str(rm), str(prompts), tmp_path / "broken", **base)

    def hung(signum, frame):
        raise TimeoutError("the ranks did not stop")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(300)  # a deadlock (one rank in a barrier, the other in a collective) would hang here
    try:
        start = time.perf_counter()
        # one line naming a rank (which rank reports first is a race; both raise the same error)
        with pytest.raises(Exception, match="step 2: a reward or advantage is not finite") as err:
            train_ppo(broken)
        elapsed = time.perf_counter() - start
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert "after step 1" in str(err.value)
    assert (broken.output_dir / "state" / "latest").read_text().strip() == "step-1"
    assert [r["step"] for r in read_metrics(broken.output_dir, split="train")] == [1]
    print(f"two ranks stopped {elapsed:.1f} s after start")

    save_file(good, rm / "model.safetensors", metadata={"format": "pt"})
    train_ppo(dataclasses.replace(broken, resume=True))
    train_ppo(straight)
    want, got = (
        read_metrics(straight.output_dir, split="train"),
        read_metrics(broken.output_dir, split="train"),
    )
    assert [r["step"] for r in got] == [1, 2]
    for w, g in zip(want, got, strict=True):
        for key in ("reward", "kl", "policy_loss", "value_loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (w["step"], key)
    wa = load_file(straight.output_dir / "policy" / "model.safetensors")
    wb = load_file(broken.output_dir / "policy" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6)
