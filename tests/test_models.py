"""Backbones, the per-token reward head, segppo.json, and the reward-model layouts segppo imports."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import ARCHITECTURES, CHATML_TEMPLATE, tiny_config, tiny_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    GenerationConfig,
)

from segppo.data import ChatFormat
from segppo.models import (
    MetadataError,
    SegppoMetadata,
    create_reward_model,
    load_policy,
    load_reward_model,
    load_tokenizer,
    reward_values,
    save_policy,
    save_reward_model,
    scalar_head,
)

# The head each architecture's *ForTokenClassification class names.
HEAD = {
    "llama": "score",
    "qwen2": "score",
    "mistral": "score",
    "phi3": "score",
    "gpt2": "classifier",
    "gpt_neox": "classifier",
    "llama-tied": "score",
    "qwen2-tied": "score",
}


def _ids(batch=2, seq=7, seed=0):
    # Ids from 4 up: never the pad (0), BOS (1) or EOS (3) of the tiny configs.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 384, (batch, seq), generator=g)


def _save_causal_lm(arch, folder, **overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=ARCHITECTURES)
def causal_lm(request, tmp_path_factory):
    """(arch, folder, model): a saved tiny causal LM with a tokenizer."""
    folder = tmp_path_factory.mktemp(f"lm-{request.param}")
    return request.param, folder, _save_causal_lm(request.param, folder).eval()


def _metadata(**fields):
    values = dict(
        kind="reward_model",
        granularity="segment",
        threshold=2.0,
        segmenter="tiny-sft",
        normalizer={"params": [-0.5, -0.1, 1.0, 2.0], "sigma_floor": 0.01, "r2_mean": 0.9},
        chat_template=None,
        data={"dataset": "tiny/prefs", "split": "train", "num_pairs": 12},
        base_model="tiny-sft",
    )
    values.update(fields)
    return SegppoMetadata(**values)


# --- creating a reward model from a causal LM ---------------------------------------------------


def test_create_reward_model_uses_the_causal_lm_backbone(causal_lm):
    arch, folder, lm = causal_lm
    rm = create_reward_model(folder)
    assert type(rm).__name__.endswith("ForTokenClassification")
    assert rm.config.num_labels == 1
    assert scalar_head(rm) is getattr(rm, HEAD[arch])
    assert rm.dropout.p == 0.0

    ids = _ids()
    with torch.no_grad():
        lm_hidden = lm(ids, output_hidden_states=True).hidden_states[-1]
        rm_hidden = rm(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(rm_hidden, lm_hidden)

    head = scalar_head(rm)
    assert torch.equal(head.bias, torch.zeros(1))
    assert not head.bias.requires_grad and head.weight.requires_grad


def test_head_init_std(causal_lm, tmp_path):
    arch = causal_lm[0]
    # A wider model than the shared fixture, so the std estimate has ~4% error.
    wide = {"n_embd": 256} if arch == "gpt2" else {"hidden_size": 256}
    _save_causal_lm(arch, tmp_path, **wide)
    torch.manual_seed(1)
    weight = scalar_head(create_reward_model(tmp_path)).weight.detach()
    expected = 1 / math.sqrt(256 + 1)
    assert weight.std().item() == pytest.approx(expected, rel=0.2)
    assert abs(weight.mean().item()) < 4 * expected / math.sqrt(256)


def test_gradient_step_moves_head_weight_not_bias(causal_lm):
    rm = create_reward_model(causal_lm[1])
    head = scalar_head(rm)
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
    optimizer = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    values = reward_values(rm, ids, torch.ones_like(ids))
    assert values.shape == ids.shape and values.dtype == torch.float32
    (-values.mean()).backward()
    optimizer.step()
    assert not torch.equal(head.weight, weight)
    assert torch.equal(head.bias, bias)


def test_save_loads_with_plain_transformers(causal_lm, tmp_path):
    arch, folder, _ = causal_lm
    rm = create_reward_model(folder).eval()
    metadata = _metadata()
    save_reward_model(rm, load_tokenizer(folder), tmp_path / "rm", metadata)

    files = {p.name for p in (tmp_path / "rm").iterdir()}
    assert "model.safetensors" in files and "segppo.json" in files and "tokenizer.json" in files
    assert not any(name.endswith(".bin") for name in files)

    plain = AutoModelForTokenClassification.from_pretrained(tmp_path / "rm").eval()
    loaded, loaded_metadata = load_reward_model(tmp_path / "rm")
    for name, tensor in rm.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor), name
    ids = _ids()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain_values = plain(ids).logits[..., 0]
        torch.testing.assert_close(reward_values(loaded, ids, mask), plain_values, rtol=0, atol=0)
        # Equal weights, but memory-mapped tensors sit at other alignments, so BLAS may round the
        # last bit differently.
        torch.testing.assert_close(plain_values, rm(ids).logits[..., 0], rtol=0, atol=1e-6)
    assert not scalar_head(loaded).bias.requires_grad
    # The tokenizer's template is recorded when the metadata leaves it empty.
    assert loaded_metadata == _metadata(chat_template=load_tokenizer(folder).chat_template)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_matches_unpadded(arch, tmp_path):
    _save_causal_lm(arch, tmp_path)
    rm = create_reward_model(tmp_path).eval()
    rows = [_ids(1, 7, seed=1)[0], _ids(1, 4, seed=2)[0]]
    ids = torch.zeros(2, 7, dtype=torch.long)  # pad id 0, left padding
    mask = torch.zeros(2, 7, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 7 - len(row) :] = row
        mask[b, 7 - len(row) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        explicit = reward_values(rm, ids, mask, position_ids)
        derived = reward_values(rm, ids, mask)
        for b, row in enumerate(rows):
            alone = reward_values(rm, row[None], torch.ones(1, len(row), dtype=torch.long))[0]
            torch.testing.assert_close(explicit[b, 7 - len(row) :], alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(derived[b, 7 - len(row) :], alone, rtol=0, atol=1e-5)
    assert torch.all(explicit[1, :3] == 0)  # padding reads 0


# --- importing other layouts ---------------------------------------------------------------------


def _save_paper_layout(arch, folder, head="score", with_prefix=False):
    """The paper's (OpenRLHF's) reward model folder: backbone + bias-free head, mean/std in config."""
    torch.manual_seed(0)
    config = tiny_config(arch)
    lm = AutoModelForCausalLM.from_config(config)
    prefix = lm.base_model_prefix
    weights = {k: v for k, v in lm.state_dict().items() if k.startswith(prefix + ".")}
    head_weight = torch.randn(1, config.hidden_size)
    weights[f"{head}.weight"] = head_weight
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors", {"format": "pt"})
    values = config.to_dict()
    values.update(architectures=["RewardModel"], mean=0.25, std=1.5, normalize_reward=False)
    if with_prefix:
        values["value_head_prefix"] = head
    (folder / "config.json").write_text(json.dumps(values))
    return lm.eval(), head_weight


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_paper_layout_import(arch, tmp_path):
    lm, head_weight = _save_paper_layout(arch, tmp_path)
    with pytest.raises(ValueError, match="granularity"):
        load_reward_model(tmp_path)
    rm, metadata = load_reward_model(tmp_path, granularity="segment", threshold=1.75)
    assert (metadata.granularity, metadata.threshold) == ("segment", 1.75)
    assert (metadata.score_mean, metadata.score_std) == (0.25, 1.5)
    assert metadata.extra["imported_from"]["layout"] == "paper"
    ids = _ids()
    with torch.no_grad():
        hidden = lm(ids, output_hidden_states=True).hidden_states[-1]
        expected = (hidden @ head_weight.T)[..., 0]
        torch.testing.assert_close(reward_values(rm, ids, torch.ones_like(ids)), expected)
    assert torch.equal(scalar_head(rm).bias, torch.zeros(1))


def test_import_refuses_a_partial_backbone(tmp_path):
    _save_paper_layout("llama", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", {"format": "pt"})
    with pytest.raises(ValueError, match="up_proj"):
        load_reward_model(tmp_path, granularity="bandit")


def test_paper_layout_with_value_head_prefix(tmp_path):
    _, head_weight = _save_paper_layout("llama", tmp_path, head="value_head", with_prefix=True)
    rm, metadata = load_reward_model(tmp_path, granularity="token")
    assert torch.equal(scalar_head(rm).weight, head_weight)
    assert metadata.granularity == "token"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sequence_classification_import_is_bandit(arch, tmp_path):
    torch.manual_seed(0)
    seq = AutoModelForSequenceClassification.from_config(tiny_config(arch, num_labels=1)).eval()
    seq.save_pretrained(tmp_path)
    rm, metadata = load_reward_model(tmp_path)
    assert metadata.granularity == "bandit"
    ids = _ids()
    with torch.no_grad():
        score = seq(ids).logits[:, 0]
        values = reward_values(rm, ids, torch.ones_like(ids))
    torch.testing.assert_close(values[:, -1], score)


def test_pickle_only_folder_loads(tmp_path):
    # Older reward models ship pytorch_model.bin only; it is read with weights_only=True.
    torch.manual_seed(0)
    seq = AutoModelForSequenceClassification.from_config(tiny_config("gpt2", num_labels=1)).eval()
    seq.config.architectures = [type(seq).__name__]
    seq.config.save_pretrained(tmp_path)
    torch.save(seq.state_dict(), tmp_path / "pytorch_model.bin")
    rm, _ = load_reward_model(tmp_path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(reward_values(rm, ids, torch.ones_like(ids))[:, -1], seq(ids).logits[:, 0])


def test_head_with_several_labels_is_refused(tmp_path):
    AutoModelForSequenceClassification.from_config(tiny_config("llama", num_labels=2)).save_pretrained(
        tmp_path / "seq"
    )
    AutoModelForTokenClassification.from_config(tiny_config("gpt2", num_labels=3)).save_pretrained(
        tmp_path / "tok"
    )
    for name in ("seq", "tok"):
        with pytest.raises(ValueError, match="1"):
            load_reward_model(tmp_path / name, granularity="token")


def test_plain_token_classification_needs_a_granularity(tmp_path):
    torch.manual_seed(0)
    AutoModelForTokenClassification.from_config(tiny_config("phi3", num_labels=1)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="granularity"):
        load_reward_model(tmp_path)
    rm, metadata = load_reward_model(tmp_path, granularity="token")
    assert metadata.extra["imported_from"]["layout"] == "token_classification"
    assert rm.dropout.p == 0.0 and not scalar_head(rm).bias.requires_grad


def test_missing_folder_or_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_reward_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_reward_model(tmp_path / "absent")
    (tmp_path / "config.json").write_text(tiny_config("llama").to_json_string())
    with pytest.raises(FileNotFoundError, match="no model weights"):
        load_reward_model(tmp_path)


def test_causal_lm_is_not_a_reward_model(tmp_path):
    _save_causal_lm("llama", tmp_path)
    with pytest.raises(ValueError, match="create_reward_model"):
        load_reward_model(tmp_path, granularity="bandit")


# --- trust_remote_code stays off -----------------------------------------------------------------

REMOTE_CODE = (
    "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nraise RuntimeError('remote code ran')\n"
)


def _add_remote_code(folder, marker, model_type=None):
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForCausalLM": "evil.EvilModel",
        "AutoModelForTokenClassification": "evil.EvilModel",
    }
    if model_type:
        config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))


def test_auto_map_code_never_runs_by_default(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "lm"
    _save_causal_lm("llama", folder)
    _add_remote_code(folder, marker)
    assert type(load_policy(folder)).__name__ == "LlamaForCausalLM"
    assert type(create_reward_model(folder)).__name__ == "LlamaForTokenClassification"
    load_tokenizer(folder)
    rm_folder = tmp_path / "rm"
    save_reward_model(create_reward_model(folder), None, rm_folder, _metadata())
    _add_remote_code_to_config(rm_folder, marker)
    assert type(load_reward_model(rm_folder)[0]).__name__ == "LlamaForTokenClassification"
    assert not marker.exists()


def _add_remote_code_to_config(folder, marker):
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForTokenClassification": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))


def test_unknown_architecture_with_auto_map_fails_without_running_code(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "lm"
    _save_causal_lm("llama", folder)
    _add_remote_code(folder, marker, model_type="evil_arch")
    for load in (load_policy, create_reward_model, load_reward_model):
        with pytest.raises(ValueError, match="trust_remote_code"):
            load(folder)
    assert not marker.exists()


# --- policies and tokenizers ---------------------------------------------------------------------


def test_load_policy_dtype_and_checkpointing(tmp_path):
    _save_causal_lm("qwen2", tmp_path)
    policy = load_policy(tmp_path, dtype="bf16", gradient_checkpointing=True)
    assert next(policy.parameters()).dtype == torch.bfloat16
    assert any(getattr(m, "gradient_checkpointing", False) for m in policy.modules())
    assert policy.config.use_cache is False
    assert next(load_policy(tmp_path, dtype="fp32").parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        load_policy(tmp_path, dtype="half-ish")


def test_save_policy_loads_with_plain_transformers(tmp_path):
    _save_causal_lm("gpt_neox", tmp_path / "lm")
    policy = load_policy(tmp_path / "lm").eval()
    save_policy(policy, load_tokenizer(tmp_path / "lm"), tmp_path / "policy")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, policy(ids).logits, rtol=0, atol=0)
    metadata = SegppoMetadata.load(tmp_path / "policy" / "segppo.json")
    assert metadata.kind == "policy" and metadata.chat_template is not None
    with pytest.raises(MetadataError, match="kind"):
        save_policy(policy, None, tmp_path / "x", _metadata())


def _save_templated_policy(tmp_path):
    """A base model (its tokenizer has no template) saved as a policy trained in ChatML: the run
    gave the template (--chat-template, or the reward model's segppo.json) and stopped its
    rollouts at the template's end of turn as well as at the tokenizer's EOS."""
    _save_causal_lm("llama", tmp_path / "lm")
    (tmp_path / "lm" / "chat_template.jinja").unlink()
    tiny_tokenizer(chat_template=False).save_pretrained(tmp_path / "lm")
    chat = ChatFormat(load_tokenizer(tmp_path / "lm"), CHATML_TEMPLATE)
    assert chat.stop_token_ids == [1, 3]  # the tokenizer's EOS, then the template's <|im_end|>
    metadata = SegppoMetadata(kind="policy", **chat.metadata_fields())
    save_policy(load_policy(tmp_path / "lm"), chat.tokenizer, tmp_path / "policy", metadata)
    return tmp_path / "policy"


def test_a_saved_policy_s_tokenizer_has_the_template_it_was_trained_in(tmp_path):
    folder = _save_templated_policy(tmp_path)
    assert AutoTokenizer.from_pretrained(folder).chat_template == CHATML_TEMPLATE
    assert load_tokenizer(tmp_path / "lm").chat_template is None  # the run's tokenizer is unchanged


def test_a_saved_policy_s_generate_stops_where_its_rollouts_stopped(tmp_path):
    folder = _save_templated_policy(tmp_path)
    assert GenerationConfig.from_pretrained(folder).eos_token_id == [1, 3]


def test_a_reward_model_folder_is_not_loaded_as_a_causal_lm(tmp_path):
    """`--policy`, `--reference`, `--segmenter` or eval's `--policy` given a reward model folder:
    AutoModelForCausalLM loaded its backbone and gave it a new random LM head, and PPO trained it."""
    _save_causal_lm("llama", tmp_path / "lm")
    save_reward_model(create_reward_model(tmp_path / "lm"), None, tmp_path / "rm", _metadata())
    with pytest.raises(
        ValueError, match=r"rm: a LlamaForTokenClassification \(a reward model\), not a causal LM"
    ):
        load_policy(tmp_path / "rm")
    assert load_policy(tmp_path / "lm") is not None


def test_tokenizer_pad_falls_back_to_eos(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "eos")
    loaded = load_tokenizer(tmp_path / "eos")
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert len(loaded) == len(tokenizer)

    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="add_pad_token"):
        load_tokenizer(tmp_path / "bare")
    assert load_tokenizer(tmp_path / "bare", add_pad_token=True).pad_token == "<pad>"


# --- atomic saves --------------------------------------------------------------------------------


@pytest.fixture
def saved_rm(tmp_path):
    _save_causal_lm("llama", tmp_path / "lm")
    rm = create_reward_model(tmp_path / "lm")
    out = tmp_path / "out" / "rm"
    save_reward_model(rm, None, out, _metadata())
    (out / "marker").write_text("old")
    return rm, out


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p != out)


def test_failed_metadata_keeps_the_old_folder(saved_rm):
    rm, out = saved_rm
    with pytest.raises(MetadataError, match="threshold"):
        save_reward_model(rm, None, out, _metadata(threshold=float("nan")))
    with pytest.raises(MetadataError, match="not JSON-serialisable"):
        save_reward_model(rm, None, out, _metadata(data={"rows": object()}))
    assert (out / "marker").read_text() == "old"
    assert _leftovers(out) == []


def test_failure_mid_write_keeps_the_old_folder(saved_rm, monkeypatch):
    rm, out = saved_rm
    real_save = type(rm).save_pretrained

    def save_then_fail(self, folder, **kwargs):
        real_save(self, folder, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(type(rm), "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_reward_model(rm, None, out, _metadata())
    assert (out / "marker").read_text() == "old"
    assert _leftovers(out) == []


def test_successful_save_replaces_the_old_folder(saved_rm):
    rm, out = saved_rm
    save_reward_model(rm, None, out, _metadata(threshold=3.0))
    assert not (out / "marker").exists()
    assert SegppoMetadata.load(out / "segppo.json").threshold == 3.0
    assert _leftovers(out) == []


# --- segppo.json ---------------------------------------------------------------------------------


def test_metadata_round_trip_keeps_unknown_keys(tmp_path):
    path = tmp_path / "segppo.json"
    _metadata().save(path)
    values = json.loads(path.read_text())
    assert values["segppo_version"] and values["normalizer"]["params"] == [-0.5, -0.1, 1.0, 2.0]
    values["from_the_future"] = {"x": 1}
    path.write_text(json.dumps(values))
    loaded = SegppoMetadata.load(path)
    assert loaded.extra == {"from_the_future": {"x": 1}}
    loaded.save(path)
    assert json.loads(path.read_text()) == values


@pytest.mark.parametrize(
    "text, field",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"granularity": "token"}', "'kind'"),
        ('{"kind": "critic"}', "'kind'"),
        ('{"kind": "reward_model", "granularity": "sentence"}', "'granularity'"),
        ('{"kind": "reward_model", "granularity": "segment"}', "'threshold'"),
        ('{"kind": "reward_model", "granularity": "segment", "threshold": "2"}', "'threshold'"),
        ('{"kind": "reward_model", "score_std": -1}', "'score_std'"),
        ('{"kind": "reward_model", "normalizer": {"params": [1, 2, 3]}}', "'normalizer.params'"),
        ('{"kind": "reward_model", "normalizer": {"params": [1,2,3,4], "sigma_floor": 0}}', "sigma_floor"),
    ],
)
def test_malformed_metadata_names_file_and_field(tmp_path, text, field):
    path = tmp_path / "segppo.json"
    path.write_text(text)
    with pytest.raises(MetadataError) as error:
        SegppoMetadata.load(path)
    assert str(path) in str(error.value) and field in str(error.value)


def test_bandit_metadata_round_trip():
    # DESIGN §3.3: a bandit RM's global mean/std is the normalizer [0, 0, mean, std].
    bandit = _metadata(granularity="bandit", threshold=None, normalizer=None, score_mean=0.3, score_std=2.0)
    assert SegppoMetadata.from_dict(json.loads(bandit.to_json())) == bandit


def test_bf16_checkpoint_loads_for_training_in_float32_unless_bf16_is_asked(tmp_path):
    # Hub checkpoints are mostly saved in bf16; without --bf16 the trained models must be float32.
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).to(torch.bfloat16).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.dtype for p in load_policy(tmp_path).parameters()} == {torch.float32}
    assert {p.dtype for p in create_reward_model(tmp_path).parameters()} == {torch.float32}
    assert next(load_policy(tmp_path, dtype="bf16").parameters()).dtype == torch.bfloat16
    assert next(load_policy(tmp_path, dtype="auto").parameters()).dtype == torch.bfloat16


def test_same_model_compares_local_folders_by_config_and_weights(tmp_path):
    """A copy of a model folder is the same model; a checkpoint of the same size whose weights differ
    at the start or the end of the file, or whose config differs, is another. Hub names compare as names."""
    from segppo.models.loading import same_model

    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    weights = random.Random(0).randbytes(4 << 20)  # 4 MiB: sampled, not hashed whole
    (a / "model.safetensors").write_bytes(weights)

    def variant(name, config=None, flip=None):
        """A copy of `a`, with another config or the byte at `flip` of its weights changed."""
        folder = tmp_path / name
        shutil.copytree(a, folder)
        if flip is not None:
            data = bytearray(weights)
            data[flip] ^= 0xFF
            (folder / "model.safetensors").write_bytes(data)
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        return str(folder)

    assert same_model(str(a), variant("copy"))
    assert same_model(str(a), variant("same_config", {"hidden_size": 8, "model_type": "llama"}))
    assert not same_model(str(a), variant("first", flip=0))
    assert not same_model(str(a), variant("last", flip=len(weights) - 1))
    assert not same_model(str(a), variant("config", {"model_type": "llama", "hidden_size": 16}))
    assert same_model("org/model", "org/model") and not same_model("org/model", "org/other")
