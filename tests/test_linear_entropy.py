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
