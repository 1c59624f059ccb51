"""linear_entropy_logprobs (the fused head) against a float64 oracle and the unfused path.

`small_chunks` makes the op walk a few-dozen-token, few-dozen-entry problem in many token and
vocabulary chunks, so the online log-sum-exp rescaling and the chunked backward are exercised.
"""

from __future__ import annotations

import pytest
import segppo.kernels.linear_entropy as linear_entropy_module
import torch
from segppo.kernels.linear_entropy import linear_entropy_logprobs, linear_entropy_logprobs_reference

N, H, V = 37, 8, 53


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(linear_entropy_module, "CHUNK_ELEMENTS", 64)  # 4 tokens × 16 entries
    monkeypatch.setattr(linear_entropy_module, "VOCAB_CHUNK", 16)  # 4 chunks, the last of 5


def oracle(hidden, weight, targets, temperature, bias=None):
    """Entropy and log-probs from the whole logits in float64."""
    logits = torch.nn.functional.linear(
        hidden.double(), weight.double(), None if bias is None else bias.double()
    )
    logp = torch.log_softmax(logits / temperature, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy, None if targets is None else logp.gather(1, targets[:, None]).squeeze(1)


def inputs(dtype, *, scale=3.0, with_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * scale).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=g).to(dtype).requires_grad_() if with_bias else None
    targets = torch.randint(V, (N,), generator=g)
    return hidden, weight, bias, targets


def loss_of(entropy, logprobs):
    """A loss that weighs every token's two outputs differently (catches swapped rows)."""
    w = torch.linspace(-1.0, 2.0, entropy.shape[0], dtype=entropy.dtype)
    total = (w * entropy).sum()
    return total if logprobs is None else total + (w.flip(0) * logprobs).sum()


def values_and_grads(fn, hidden, weight, bias, targets, temperature):
    entropy, logprobs = fn(hidden, weight, targets, temperature=temperature, bias=bias)
    params = [p for p in (hidden, weight, bias) if p is not None]
    grads = torch.autograd.grad(loss_of(entropy, logprobs), params)
    return entropy, logprobs, grads


def assert_close_all(got, want, **tol):
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        elif isinstance(w, (tuple, list)):
            assert_close_all(g, w, **tol)
        else:
            torch.testing.assert_close(g.double(), w.double(), **tol)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_targets", [False, True])
def test_float64_matches_the_float64_oracle(temperature, with_bias, with_targets):
    hidden, weight, bias, targets = inputs(torch.float64, with_bias=with_bias)
    targets = targets if with_targets else None
    got = values_and_grads(linear_entropy_logprobs, hidden, weight, bias, targets, temperature)
    want = values_and_grads(oracle, hidden, weight, bias, targets, temperature)
    assert got[0].dtype == torch.float64
    assert_close_all(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_matches_the_unfused_path(temperature, with_bias):
    hidden, weight, bias, targets = inputs(torch.float32, scale=1.5, with_bias=with_bias)
    got = values_and_grads(linear_entropy_logprobs, hidden, weight, bias, targets, temperature)
    want = values_and_grads(linear_entropy_logprobs_reference, hidden, weight, bias, targets, temperature)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert_close_all(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits(dtype):
    """Logits of ~±1e4, a max in the last vocabulary chunk for some rows and in the first for
    others, a large offset shared by the whole row, at a low temperature: exact, never inf/NaN."""
    hidden, weight, bias, targets = inputs(dtype, scale=30.0, seed=1)
    with torch.no_grad():
        bias += torch.linspace(0.0, 5e3, V, dtype=dtype)
        hidden[: N // 2] *= -1.0  # these rows' largest logits sit in the first chunk
        hidden[N // 2 :] += 1e3 / H
    got = values_and_grads(linear_entropy_logprobs, hidden, weight, bias, targets, 0.3)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    want = values_and_grads(oracle, hidden, weight, bias, targets, 0.3)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    # Absolute: the log-probs reach −1e4 and carry float32 rounding of logits of that size.
    assert_close_all(got[:1], want[:1], rtol=tol, atol=tol)
    assert_close_all(got[1:], want[1:], rtol=tol, atol=tol * 1e4)
    if dtype == torch.float32:
        unfused = values_and_grads(linear_entropy_logprobs_reference, hidden, weight, bias, targets, 0.3)
        assert_close_all(got, unfused, rtol=1e-5, atol=1e-2)


def test_tied_embeddings_gradient_adds_both_uses():
    """The head's weight is the input embedding: its gradient is the sum over both uses, as through
    the unfused path."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(V, (N,), generator=g)
    mix = torch.randn(H, H, generator=g, dtype=torch.float64)

    def run(fn):
        emb = torch.nn.Embedding(V, H, dtype=torch.float64)
        with torch.no_grad():
            emb.weight.copy_(
                torch.randn(V, H, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            )
        hidden = torch.tanh(emb(ids) @ mix)
        entropy, logprobs = fn(hidden, emb.weight, ids.roll(1), temperature=0.8)
        loss_of(entropy, logprobs).backward()
        return entropy, logprobs, emb.weight.grad

    want = run(linear_entropy_logprobs_reference)
    assert_close_all(run(linear_entropy_logprobs), want, rtol=1e-5, atol=1e-6)
    assert_close_all(run(linear_entropy_logprobs), run(oracle), rtol=1e-10, atol=1e-10)


def test_one_output_grads_and_frozen_weight():
    """Only the log-probs reach the loss, and the weight is frozen: the hidden gradient is right
    and the weight gets none."""
    hidden, weight, _, targets = inputs(torch.float64, with_bias=False)
    weight = weight.detach()
    _, logprobs = linear_entropy_logprobs(hidden, weight, targets, temperature=1.3)
    (grad,) = torch.autograd.grad(logprobs.sum(), hidden)
    _, want_lp = oracle(hidden, weight, targets, 1.3)
    (want,) = torch.autograd.grad(want_lp.sum(), hidden)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10)


def test_bfloat16_follows_the_unfused_path():
    """bf16 chunk logits are rounded as lm_head rounds them: the result is the unfused one up to
    the products' blocking."""
    hidden, weight, bias, targets = inputs(torch.bfloat16, scale=1.0)
    got = values_and_grads(linear_entropy_logprobs, hidden, weight, bias, targets, 1.0)
    want = values_and_grads(linear_entropy_logprobs_reference, hidden, weight, bias, targets, 1.0)
    assert got[0].dtype == torch.float32 and got[2][0].dtype == torch.bfloat16
    assert_close_all(got[:2], want[:2], rtol=2e-2, atol=2e-2)
    assert_close_all(got[2], want[2], rtol=5e-2, atol=5e-2)


def test_nan_hidden_row_is_nan_and_others_are_untouched():
    hidden, weight, bias, targets = inputs(torch.float32)
    with torch.no_grad():
        hidden[5, 3] = float("nan")
    entropy, logprobs = linear_entropy_logprobs(hidden, weight, targets, bias=bias)
    assert entropy[5].isnan() and logprobs[5].isnan()
    keep = torch.arange(N) != 5
    want_e, want_lp = linear_entropy_logprobs_reference(hidden[keep], weight, targets[keep], bias=bias)
    torch.testing.assert_close(entropy[keep], want_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logprobs[keep], want_lp, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_one_line_errors():
    hidden, weight, _, targets = inputs(torch.float32)
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, V\)"):
        linear_entropy_logprobs(hidden, weight, torch.full_like(targets, V))
    with pytest.raises(ValueError, match="hidden must be"):
        linear_entropy_logprobs(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="share dtype"):
        linear_entropy_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="temperature must be positive"):
        linear_entropy_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="targets must be integer"):
        linear_entropy_logprobs(hidden, weight, targets[:-1])


# --------------------------------------------------------------------------------------------
# The wiring: segppo.segments through tiny models, fused against the logits path.


def tiny_batch(vocab, seed=0):
    """Left-padded prompts of 2-5 tokens, right-padded responses of 1-6 (one row of each extreme)."""
    from segppo.data import collate_responses

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in (5, 2, 3, 4)]
    responses = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in (6, 1, 4, 6)]
    return collate_responses(prompts, responses, [True, False, True, False], pad_token_id=0)


def tiny_model(arch, **overrides):
    from tiny import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).float().eval()  # no dropout


def unfused_logprobs_and_entropy(model, batch, temperature):
    """The pre-fusion code of `segments.logprobs_and_entropy`: the logits, then entropy_logprobs."""
    from segppo.kernels import entropy_logprobs
    from segppo.segments import last_logits

    P, T = batch.prompt_len, batch.response_mask.shape[1]
    logits = last_logits(model, batch.input_ids, batch.attention_mask, batch.position_ids, T + 1)
    targets = torch.nn.functional.pad(batch.input_ids[:, P:], (0, 1), value=0)
    entropy, logprobs = entropy_logprobs(logits, targets, temperature=temperature)
    return logprobs[:, :-1], entropy[:, 1:]


def values_and_param_grads(fn, model, batch):
    mask = batch.response_mask
    logprobs, entropy = fn(model, batch)
    loss = torch.where(mask, logprobs * 0.7 - entropy * 0.3, 0.0).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return [torch.where(mask, logprobs, 0.0), torch.where(mask, entropy, 0.0), *grads]


@pytest.fixture
def head_calls(monkeypatch):
    """Counts the fused head's calls made through `segppo.segments`."""
    from segppo import segments

    calls = []
    fused = segments.linear_entropy_logprobs
    monkeypatch.setattr(
        segments, "linear_entropy_logprobs", lambda *a, **k: calls.append(1) or fused(*a, **k)
    )
    return calls


@pytest.fixture(params=["fused", "plain"])
def head_path(request, monkeypatch):
    """Each head path of `head_entropy_logprobs`: on CPU the tiny vocabulary takes the plain one by
    default (`fuses_head`), and a zero size threshold forces the fused one."""
    from segppo import segments

    if request.param == "fused":
        monkeypatch.setattr(segments, "CPU_FUSED_HEAD_MIN_LOGITS_BYTES", 0)
    return request.param


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("llama", {}),
        ("llama-tied", {}),
        ("qwen2", {}),
        ("qwen2-tied", {}),
        ("gpt2", {}),
        ("gpt_neox", {}),
        ("phi3", {}),
        ("gemma3", {}),
        ("smollm3", {}),
        ("qwen3-moe", {}),
    ],
)
def test_segments_head_paths_match_the_logits_path(arch, overrides, head_path, head_calls):
    from segppo import segments

    model, batch = tiny_model(arch, **overrides), tiny_batch(384)
    head = segments.plain_linear_head(model)
    assert head is model.get_output_embeddings()
    if model.config.tie_word_embeddings:  # the weight's gradient sums both uses (checked below)
        assert head.weight is model.get_input_embeddings().weight
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)

    def under_test(m, b):
        return segments.logprobs_and_entropy(m, *args, temperature=0.7)

    def unfused(m, b):
        return unfused_logprobs_and_entropy(m, b, 0.7)

    got = values_and_param_grads(under_test, model, batch)
    assert len(head_calls) == (1 if head_path == "fused" else 0)
    want = values_and_param_grads(unfused, model, batch)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # The segmenter's entropy (T = 1, no grad) is the one of the same columns.
    entropy = segments.segmenter_entropy(model, *args)
    _, want_entropy = unfused_logprobs_and_entropy(model, batch, 1.0)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    assert head.forward.__func__ is torch.nn.Linear.forward  # the head is restored


def test_fused_head_never_builds_the_logits(monkeypatch):
    """On the fused path the head's matmul never runs on the hidden states."""
    from segppo import segments

    monkeypatch.setattr(segments, "CPU_FUSED_HEAD_MIN_LOGITS_BYTES", 0)
    model, batch = tiny_model("qwen2"), tiny_batch(384)
    calls = []
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: calls.append(self) or x @ self.weight.T)
    segments.logprobs_and_entropy(model, batch.input_ids, batch.attention_mask, batch.position_ids, 5)
    assert model.get_output_embeddings() not in calls


def test_where_the_head_is_fused():
    """Always on an accelerator (memory limits the batch there); on CPU from the size threshold on."""
    from segppo import segments

    limit = segments.CPU_FUSED_HEAD_MIN_LOGITS_BYTES
    cpu = torch.device("cpu")
    assert segments.fuses_head(1, 384, torch.device("cuda", 0))
    assert not segments.fuses_head(132, 49152, cpu)  # a PPO micro-batch of SmolLM2: 25 MiB of logits
    assert not segments.fuses_head(limit // (4 * 49152), 49152, cpu)
    assert segments.fuses_head(limit // (4 * 49152) + 1, 49152, cpu)


def softcapped_gemma2():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma2",
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        pad_token_id=0,
        final_logit_softcapping=3.0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


class ScaledHead(torch.nn.Linear):
    """A head that is not a plain nn.Linear: its logits are doubled."""

    def forward(self, x):
        return super().forward(x) * 2.0


@pytest.mark.parametrize(
    "which", ["gemma2 softcapping", "gemma3 with softcapping", "non-Linear head", "llama with logits_scaling"]
)
def test_other_heads_keep_the_logits_path(which, monkeypatch, head_calls):
    from segppo import segments

    monkeypatch.setattr(segments, "CPU_FUSED_HEAD_MIN_LOGITS_BYTES", 0)  # fused wherever it may be
    batch = tiny_batch(384)
    if which == "gemma2 softcapping":
        model = softcapped_gemma2()
    elif which == "gemma3 with softcapping":  # a plain model type, but this config softcaps
        model = tiny_model("gemma3", final_logit_softcapping=2.0)
    elif which == "non-Linear head":
        model = tiny_model("llama")
        scaled = ScaledHead(32, 384, bias=False)
        scaled.weight = model.lm_head.weight
        model.lm_head = scaled
    else:  # a plain model type that nonetheless declares a logit transform
        model = tiny_model("llama", logits_scaling=4.0)
    assert segments.plain_linear_head(model) is None
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
    got = segments.logprobs_and_entropy(model, *args, temperature=0.7)
    assert not head_calls
    want = unfused_logprobs_and_entropy(model, batch, 0.7)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    if which != "llama with logits_scaling":  # the transform matters: the fused head would be wrong
        hidden = segments.last_hidden(model, model.get_output_embeddings(), *args[:3], 3)
        wrong, _ = linear_entropy_logprobs(hidden.reshape(-1, 32), model.get_output_embeddings().weight)
        right = segments.head_entropy_logprobs(model, *args[:3], 3)[0]
        assert not torch.allclose(wrong, right.reshape(-1), atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_lora_actor_and_its_disabled_adapters_use_the_fused_head(arch, monkeypatch, head_calls):
    """A LoRA-wrapped policy (peft leaves the LM head plain, tied or not) and the reference it gives
    with the adapters switched off both take the fused head and match the logits path."""
    pytest.importorskip("peft")
    from segppo import segments

    monkeypatch.setattr(segments, "CPU_FUSED_HEAD_MIN_LOGITS_BYTES", 0)
    from segppo.models.lora import adapters_disabled, apply_lora

    model = apply_lora(tiny_model(arch), 4, 8.0)
    with torch.no_grad():  # non-zero adapters, so that switching them off changes the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(4))
    assert segments.plain_linear_head(model) is not None
    batch = tiny_batch(384)
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
    actor = segments.logprobs_and_entropy(model, *args, temperature=0.7)
    for g, w in zip(actor, unfused_logprobs_and_entropy(model, batch, 0.7), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with adapters_disabled(model):
        reference = segments.logprobs_and_entropy(model, *args, temperature=0.7)
        for g, w in zip(reference, unfused_logprobs_and_entropy(model, batch, 0.7), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert len(head_calls) == 2
    assert not torch.allclose(actor[0], reference[0], atol=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reference_scores_take_one_forward_pass(temperature, head_path, monkeypatch):
    """The reference's log-probs at the sampling temperature and its segmentation entropy at 1 are
    `logprobs_and_entropy`'s and `segmenter_entropy`'s, from one forward pass."""
    from segppo import segments

    model, batch = tiny_model("llama"), tiny_batch(384)
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_len)
    passes = []
    forward = segments.last_logits
    monkeypatch.setattr(segments, "last_logits", lambda *a, **k: passes.append(1) or forward(*a, **k))
    logprobs, entropy = segments.reference_logprobs_and_entropy(model, *args, temperature=temperature)
    assert len(passes) == 1
    want_logprobs, _ = segments.logprobs_and_entropy(model, *args, temperature=temperature)
    torch.testing.assert_close(logprobs, want_logprobs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy, segments.segmenter_entropy(model, *args), rtol=1e-6, atol=1e-6)
