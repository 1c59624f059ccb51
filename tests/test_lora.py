"""LoRA through peft: starts equal to the base, trains only adapters and the head, exports load
with stock transformers, and the adapter-disabled model is the untouched base (the reference)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, GenerationConfig

from segppo.models.reward_model import init_scalar_head, reward_values, scalar_head
from tests.stopping import stop_at_step
from tests.tiny import tiny_config, tiny_ppo_config, tiny_rm_config

peft = pytest.importorskip("peft")  # the `lora` extra (also in `dev`)

from segppo.models.lora import adapters_disabled, apply_lora, export_lora  # noqa: E402

IDS = torch.tensor([[5, 9, 30, 41, 7, 3], [0, 0, 12, 8, 77, 3]])
MASK = (IDS != 0).long()


def _reward_model(arch="llama"):
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(
        tiny_config(arch, num_labels=1, classifier_dropout=0.0)
    )
    init_scalar_head(model)
    return model.eval()


def _lm(arch="llama"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def _values(model):
    with torch.no_grad():
        return reward_values(model, IDS, MASK)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _train(model, steps=3):
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(steps):
        values = reward_values(model, IDS, MASK)
        loss = -torch.nn.functional.logsigmoid(values[0].sum() - values[1].sum())
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_lora_rm_starts_equal_and_trains_only_adapters_and_head(arch):
    model = _reward_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_values = _values(model)
    lora = apply_lora(model, rank=4, alpha=8)
    torch.testing.assert_close(_values(lora), base_values, rtol=0, atol=0)

    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    head = next(n for n in ("score", "classifier") if getattr(model, n, None) is not None)
    assert f"base_model.model.{head}.modules_to_save.default.weight" in trainable
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert not any(n.endswith("bias") for n in trainable)  # the head's bias stays the frozen zero

    _train(lora)
    changed = {n for n, p in lora.named_parameters() if not torch.equal(p, _initial(lora, n, before))}
    assert changed and changed <= trainable
    assert any(n.endswith(f"{head}.modules_to_save.default.weight") for n in changed)
    assert any("lora_B" in n for n in changed)
    assert not torch.equal(_values(lora), base_values)
    with adapters_disabled(lora):  # the reference: the original weights, head included
        torch.testing.assert_close(_values(lora), base_values, rtol=0, atol=0)


def _initial(lora, name, before):
    """The parameter's value before LoRA; for the adapters, which did not exist then, NaN (so they
    always count as changed, and the check is that every frozen base weight is unchanged)."""
    plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
    plain = plain.replace(".modules_to_save.default", "").replace(".original_module", "")
    if plain in before:
        return before[plain]
    return torch.full_like(dict(lora.named_parameters())[name], float("nan"))


def test_merged_export_loads_with_stock_transformers(tmp_path):
    rm = apply_lora(_reward_model(), rank=4, alpha=16)
    _train(rm)
    export_lora(rm, tmp_path / "rm")
    assert not (tmp_path / "rm" / "adapter_config.json").exists()
    loaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "rm").eval()
    torch.testing.assert_close(_values(loaded), _values(rm), rtol=1e-5, atol=1e-6)
    assert isinstance(scalar_head(loaded), torch.nn.Linear)
    assert isinstance(rm, peft.PeftModel)  # export left the training model wrapped

    lm = apply_lora(_lm(), rank=4, alpha=8, targets="q_proj,v_proj")
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # as if trained
    export_lora(lm, tmp_path / "lm")
    loaded_lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    torch.testing.assert_close(_logits(loaded_lm), _logits(lm), rtol=1e-5, atol=1e-5)
    with adapters_disabled(lm):
        torch.testing.assert_close(_logits(lm), _logits(_lm()), rtol=0, atol=0)


def _as_if_trained(model, seed=0):
    """Every adapter factor non-zero (peft starts one factor of each pair at 0: B of a linear
    layer, A of an embedding), so that each adapter changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=g))


def test_merged_export_merges_embedding_adapters(tmp_path):
    """peft keeps an embedding's adapter in `lora_embedding_A/B` (not `lora_A/B`); the merged export
    dropped it and the exported model differed from the trained one."""
    lm = apply_lora(_lm(), rank=4, alpha=8, targets="embed_tokens,q_proj")
    rm = apply_lora(_reward_model(), rank=4, alpha=8, targets="embed_tokens,q_proj")
    for model, model_class, folder in (
        (lm, AutoModelForCausalLM, "lm"),
        (rm, AutoModelForTokenClassification, "rm"),
    ):
        assert any("lora_embedding_A" in n for n, _ in model.named_parameters())
        _as_if_trained(model)
        with adapters_disabled(model):
            base = model(input_ids=IDS, attention_mask=MASK).logits
        trained = model(input_ids=IDS, attention_mask=MASK).logits
        assert not torch.allclose(trained, base, atol=1e-2)
        export_lora(model, tmp_path / folder)
        loaded = model_class.from_pretrained(tmp_path / folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(input_ids=IDS, attention_mask=MASK).logits, trained, rtol=1e-5, atol=1e-5
            )


def test_adapter_only_export_reloads_onto_the_base(tmp_path):
    rm = apply_lora(_reward_model(), rank=2, alpha=4)
    _train(rm)
    export_lora(rm, tmp_path / "adapter", merged=False)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    reloaded = peft.PeftModel.from_pretrained(_reward_model(), tmp_path / "adapter").eval()
    torch.testing.assert_close(_values(reloaded), _values(rm), rtol=0, atol=0)


def test_an_adapter_export_names_its_base_from_any_working_directory(tmp_path, monkeypatch):
    """peft records the base as the policy was given (`--policy sft`); `AutoPeftModelForCausalLM`
    reads it back to load the base, from wherever the user is then."""
    from segppo.models import load_policy

    monkeypatch.chdir(tmp_path)
    _lm().save_pretrained("sft")
    lm = apply_lora(load_policy("sft"), rank=2, alpha=4)
    with torch.no_grad():  # adapters that change the logits (peft starts B at zero)
        for name, param in lm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    export_lora(lm, "adapter", merged=False)
    monkeypatch.chdir(tmp_path / "adapter")
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(lm), rtol=0, atol=0)


def test_an_export_replaces_the_folder_s_earlier_export_whole(tmp_path):
    """A merged export then an adapter export into one folder: the earlier weights must not stay
    beside the adapter (transformers would load the stale full model, or the adapter onto it)."""
    lm = apply_lora(_lm(), rank=2, alpha=4)
    export_lora(lm, tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").is_file()
    export_lora(lm, tmp_path / "export", merged=False)
    assert sorted(p.name for p in (tmp_path / "export").iterdir() if p.suffix != ".md") == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left


def test_bad_lora_settings_are_refused():
    with pytest.raises(ValueError, match="rank"):
        apply_lora(_lm(), rank=0, alpha=8)
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(_lm(), rank=4, alpha=0)
    with pytest.raises(ValueError, match="targets"):
        apply_lora(_lm(), rank=4, alpha=8, targets="no_such_proj")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with adapters_disabled(_lm()):
            pass


def test_lora_keeps_position_ids_and_logits_to_keep_of_the_base():
    """peft's forward is (*args, **kwargs): asked whether it takes `position_ids`, it said no, and a
    left-padded row was read at the wrong positions (gpt2's absolute positions show it)."""
    from segppo.segments import last_logits

    ids, mask = IDS, MASK
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    lm = _lm("gpt2")
    lora = apply_lora(_lm("gpt2"), rank=4, alpha=8)
    with torch.no_grad():
        want = last_logits(lm, ids, mask, positions, keep=3)
        torch.testing.assert_close(last_logits(lora, ids, mask, positions, keep=3), want, rtol=0, atol=0)
    rm = _reward_model("gpt2")
    torch.testing.assert_close(_values(apply_lora(_reward_model("gpt2"), rank=4, alpha=8)), _values(rm))


def test_generation_config_reaches_the_base_model():
    """`HFEngine` swaps the model's generation config for one call; `generate` reads the base's."""
    lora = apply_lora(_lm(), rank=4, alpha=8)
    config = GenerationConfig(max_new_tokens=3)
    lora.generation_config = config
    assert lora.get_base_model().generation_config is config


def test_adapter_free_view_is_the_base_inside_a_training_engine():
    """The reference under LoRA: the actor's DeepSpeed engine with its adapters off gives the base
    model's logits exactly, after the adapters have trained."""
    from segppo.config import PPOConfig
    from segppo.distributed import init_distributed
    from segppo.models.lora import AdapterFreeView
    from segppo.optim import training_engine

    init_distributed()
    cfg = PPOConfig(policy="p", reward_model="r", prompts="x", output="o", zero_stage=2, lora_rank=4)
    engine, _ = training_engine(
        apply_lora(_lm(), rank=4, alpha=8),
        lr=1e-2,
        total_steps=2,
        micro_batch_size=2,
        grad_accum=1,
        config=cfg,
    )
    for _ in range(2):
        loss = engine(input_ids=IDS, attention_mask=MASK, labels=IDS).loss
        engine.backward(loss)
        engine.step()
    reference = AdapterFreeView(engine)
    with torch.no_grad():
        base = _logits(_lm())
        torch.testing.assert_close(reference(input_ids=IDS, attention_mask=MASK).logits, base, rtol=0, atol=0)
        assert not torch.allclose(engine(input_ids=IDS, attention_mask=MASK).logits, base)  # the actor moved


# -- wired into `rm train` and `ppo train` ----------------------------------------------------------

LORA = dict(lora_rank=4, lora_alpha=8.0)


def _trained_lora(model_class, folder, state_file, targets=None, **config):
    """The LoRA model as its DeepSpeed training state holds it (adapters, trained head, base)."""
    base = model_class.from_config(AutoConfig.from_pretrained(folder, **config))
    model = apply_lora(base, rank=4, alpha=8, targets=targets)
    model.load_state_dict(torch.load(state_file, weights_only=False)["module"])
    return model.eval()


def _state_file(run, name, step):
    return run / "state" / f"step-{step}" / name / "state" / "mp_rank_00_model_states.pt"


@pytest.mark.smoke
@pytest.mark.parametrize("targets", ["all-linear", "embed_tokens,q_proj"])
def test_rm_train_with_lora_exports_the_trained_model_merged(
    tiny_lm_dir, preferences_file, tmp_path, targets
):
    from segppo.rm.trainer import train_reward_model

    cfg = tiny_rm_config(
        tiny_lm_dir, preferences_file, tmp_path / "run", max_steps=3, lora_targets=targets, **LORA
    )
    train_reward_model(cfg)
    merged = AutoModelForTokenClassification.from_pretrained(cfg.output_dir / "model").eval()
    trained = _trained_lora(
        AutoModelForTokenClassification,
        cfg.output_dir / "model",
        _state_file(cfg.output_dir, "reward_model", 3),
        targets=targets,
    )
    torch.testing.assert_close(_values(merged), _values(trained), rtol=1e-5, atol=1e-6)
    state, backbone = trained.state_dict(), load_file(f"{tiny_lm_dir}/model.safetensors")
    frozen = [k for k in state if k.endswith(".base_layer.weight")]
    assert frozen
    for key in frozen:  # only the adapters and the head trained
        plain = key.removeprefix("base_model.model.").replace(".base_layer", "")
        torch.testing.assert_close(state[key], backbone[plain], rtol=0, atol=0)
    head = "base_model.model.score"
    assert not torch.equal(
        state[f"{head}.modules_to_save.default.weight"], state[f"{head}.original_module.weight"]
    )
    weights = load_file(cfg.output_dir / "model" / "model.safetensors")
    assert not torch.equal(
        weights["model.layers.0.self_attn.q_proj.weight"], backbone["model.layers.0.self_attn.q_proj.weight"]
    )


def test_rm_lora_in_bf16_under_zero3_trains_as_under_zero2(tiny_lm_dir, preferences_file, tmp_path):
    """Under ZeRO-3 in bf16 the base is built in bf16 before the adapters are added; peft made them
    float32, and DeepSpeed's stage-3 optimizer, which flattens each group in one dtype, failed
    with a bare AssertionError."""
    from segppo.rm.trainer import train_reward_model
    from segppo.tracking import read_metrics

    plain = tiny_rm_config(
        tiny_lm_dir, preferences_file, tmp_path / "z2", max_steps=2, zero_stage=2, bf16=True, **LORA
    )
    partitioned = dataclasses.replace(plain, output=str(tmp_path / "z3"), zero_stage=3)
    train_reward_model(plain)
    train_reward_model(partitioned)
    want = read_metrics(plain.output_dir, split="train")
    got = read_metrics(partitioned.output_dir, split="train")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-3)
    a = load_file(plain.output_dir / "model" / "model.safetensors")
    b = load_file(partitioned.output_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-2, atol=1e-2)


def test_rm_lora_resume_matches_an_uninterrupted_run_and_exports_the_adapter(
    tiny_lm_dir, preferences_file, tmp_path
):
    from segppo.rm.trainer import train_reward_model
    from segppo.tracking import read_metrics

    base = dict(max_steps=4, save_every=2, lora_export="adapter", **LORA)
    straight = tiny_rm_config(tiny_lm_dir, preferences_file, tmp_path / "straight", **base)
    train_reward_model(straight)
    broken = tiny_rm_config(tiny_lm_dir, preferences_file, tmp_path / "broken", **base)

    stop_at_step(train_reward_model, broken, 3)
    train_reward_model(dataclasses.replace(broken, resume=True))
    want, got = read_metrics(straight.output_dir), read_metrics(broken.output_dir)
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for w, g in zip(want, got, strict=True):
        for key in ("loss", "accuracy", "lr"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (w["step"], key)
    folder = broken.output_dir / "model"
    assert (folder / "adapter_config.json").is_file() and (folder / "segppo.json").is_file()
    a = load_file(straight.output_dir / "model" / "adapter_model.safetensors")
    b = load_file(folder / "adapter_model.safetensors")
    assert any("score" in k for k in b)  # the trained head is saved with the adapter
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    # The adapter reloads onto the base (a fresh head: the saved one replaces it) as the trained model.
    base_model = AutoModelForTokenClassification.from_pretrained(tiny_lm_dir, num_labels=1)
    reloaded = peft.PeftModel.from_pretrained(base_model, folder).eval()
    state_file = _state_file(broken.output_dir, "reward_model", 4)
    trained = _trained_lora(AutoModelForTokenClassification, tiny_lm_dir, state_file, num_labels=1)
    torch.testing.assert_close(_values(reloaded), _values(trained), rtol=1e-5, atol=1e-6)
    from segppo.models import load_reward_model

    with pytest.raises(FileNotFoundError, match="a LoRA adapter alone"):
        load_reward_model(folder)  # PPO and eval need a whole model: a clear error, not a missing file


def test_a_policy_that_is_an_adapter_alone_is_refused_in_one_line(tiny_lm_dir, tmp_path):
    """`ppo train --lora-export adapter` writes peft's adapter files and no config.json: as another
    run's --policy the error said only "holds no config.json", and `segppo eval --policy` failed
    inside transformers ("Unrecognized model ... model_type") when its context was read. Both now say
    what the folder is."""
    from segppo.config import EvalConfig
    from segppo.models import load_policy
    from segppo.preflight import check_context, check_model

    folder = tmp_path / "policy"
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    peft.get_peft_model(lm, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="--policy .*holds a LoRA adapter alone"):
        check_model(str(folder), "policy")  # ppo train's --policy and --reference, before start-up
    with pytest.raises(FileNotFoundError, match="--policy .*holds a LoRA adapter alone"):
        check_context(str(folder), "policy", EvalConfig(policy=[str(folder)], prompts="p", output="o"))
    with pytest.raises(FileNotFoundError, match="a LoRA adapter alone"):
        load_policy(folder)  # what eval loads each --policy with


def test_eval_takes_a_run_folder_whose_policy_is_an_adapter_to_its_policy(tiny_lm_dir, tmp_path):
    """`eval --policy RUN` stands for RUN/policy; with an adapter there it stood for RUN itself, and
    failed inside transformers ("Unrecognized model in RUN") instead of naming the adapter."""
    from segppo.config import EvalConfig
    from segppo.eval.runner import policy_folder
    from segppo.preflight import check_context

    run = tmp_path / "run"
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    peft.get_peft_model(lm, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(run / "policy")
    assert policy_folder(str(run)) == str(run / "policy")
    with pytest.raises(FileNotFoundError, match="a LoRA adapter alone"):
        cfg = EvalConfig(policy=[str(run)], prompts="p", output="o")
        check_context(policy_folder(str(run)), "policy", cfg)  # what eval checks first


def test_an_rm_resume_keeps_the_lora_options_of_its_run(tiny_lm_dir, preferences_file, tmp_path):
    """A state holds the models its run built: an RM resumed with another --lora-rank died in
    DeepSpeed's load with a state-dict traceback listing every key; now one line (PPO's test is in
    test_ppo.py)."""
    from segppo.rm.trainer import train_reward_model
    from segppo.tracking import read_metrics

    run = tiny_rm_config(tiny_lm_dir, preferences_file, tmp_path / "rm", max_steps=1, granularity="token")
    train_reward_model(run)
    more = dataclasses.replace(run, resume=True, max_steps=2)
    with pytest.raises(ValueError, match="started with --lora-rank 0"):
        train_reward_model(dataclasses.replace(more, **LORA))
    train_reward_model(more)
    assert [r["step"] for r in read_metrics(run.output_dir, split="train")] == [1, 2]


@pytest.fixture(scope="module")
def ppo_inputs(tiny_lm_dir, preferences_file, tmp_path_factory):
    """A segment RM trained briefly on the tiny backbone, and a prompt file."""
    import json

    from segppo.rm.trainer import train_reward_model

    root = tmp_path_factory.mktemp("lora_ppo")
    train_reward_model(tiny_rm_config(tiny_lm_dir, preferences_file, root / "rm", max_steps=6))
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["Name the capital.", "Which city?"] * 16)
    )
    return str(root / "rm"), str(prompts)


def test_ppo_with_lora_uses_the_base_as_reference_and_exports_the_actor_merged(
    tiny_lm_dir, ppo_inputs, tmp_path
):
    from segppo.ppo.trainer import train_ppo
    from segppo.tracking import read_metrics

    cfg = tiny_ppo_config(tiny_lm_dir, ppo_inputs, tmp_path / "run", **LORA)
    train_ppo(cfg)
    rows = read_metrics(cfg.output_dir, split="train")
    # The actor starts as its base (B = 0), so the first rollout's KL to the reference is 0 up to
    # float32 rounding (the actor's log-probs come from sampling's cached passes, the reference's
    # from one full forward); after an update it is not: the reference stayed the base, adapters off.
    assert abs(rows[0]["kl"]) < 1e-6 and abs(rows[1]["kl"]) > 1e-5
    merged = AutoModelForCausalLM.from_pretrained(cfg.output_dir / "policy").eval()
    actor = _trained_lora(AutoModelForCausalLM, tiny_lm_dir, _state_file(cfg.output_dir, "actor", 2))
    torch.testing.assert_close(_logits(merged), _logits(actor), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(merged), _logits(AutoModelForCausalLM.from_pretrained(tiny_lm_dir)))
    critic = torch.load(_state_file(cfg.output_dir, "critic", 2), weights_only=False)["module"]
    head = "base_model.model.score"  # the critic's value head trains whole, beside its adapters
    assert not torch.equal(
        critic[f"{head}.modules_to_save.default.weight"], critic[f"{head}.original_module.weight"]
    )
    assert any("lora_B" in k for k in critic)


def test_ppo_lora_resume_matches_an_uninterrupted_run(tiny_lm_dir, ppo_inputs, tmp_path):
    from segppo.ppo.trainer import train_ppo
    from segppo.tracking import read_metrics

    base = dict(max_steps=2, save_every=1, **LORA)
    straight = tiny_ppo_config(tiny_lm_dir, ppo_inputs, tmp_path / "straight", **base)
    train_ppo(straight)
    broken = tiny_ppo_config(tiny_lm_dir, ppo_inputs, tmp_path / "broken", **base)

    stop_at_step(train_ppo, broken, 1)
    train_ppo(dataclasses.replace(broken, resume=True))
    want, got = read_metrics(straight.output_dir), read_metrics(broken.output_dir)
    assert [r["step"] for r in got] == [1, 2]
    for w, g in zip(want, got, strict=True):
        for key in ("reward", "kl", "policy_loss", "value_loss", "actor_lr"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (w["step"], key)
    a = load_file(straight.output_dir / "policy" / "model.safetensors")
    b = load_file(broken.output_dir / "policy" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_ppo_with_lora_under_zero3_equals_zero2(tiny_lm_dir, ppo_inputs, tmp_path):
    """LoRA on partitioned models: adapters added to a model built under ZeRO-3, the reference its
    base with the adapters off, the merged export gathered from the partitions."""
    from segppo.ppo.trainer import train_ppo
    from segppo.tracking import read_metrics

    plain = tiny_ppo_config(tiny_lm_dir, ppo_inputs, tmp_path / "plain", zero_stage=2, **LORA)
    partitioned = dataclasses.replace(plain, output=str(tmp_path / "partitioned"), zero_stage=3)
    train_ppo(plain)
    train_ppo(partitioned)
    want, got = (
        read_metrics(plain.output_dir, split="train"),
        read_metrics(partitioned.output_dir, split="train"),
    )
    assert abs(got[0]["kl"]) < 1e-6 and abs(got[1]["kl"]) > 1e-5
    for w, g in zip(want, got, strict=True):
        for key in ("reward", "kl", "policy_loss", "value_loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (w["step"], key)
    a = load_file(plain.output_dir / "policy" / "model.safetensors")
    b = load_file(partitioned.output_dir / "policy" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
