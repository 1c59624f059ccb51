"""entropy_logprobs on both paths against a float64 oracle written out here.

The oracle upcasts the logits (after any bf16/fp16 rounding) to float64, so the only error left
is the kernel's own. Without CUDA the Triton path runs under TRITON_INTERPRET=1 (see conftest).
Out-of-range targets: the Triton path gives a NaN log-prob; the torch reference raises (gather's
index error on CPU; on CUDA a device-side assert, which is why that case is not run there).
"""

import math

import pytest
import torch

from segppo.kernels import entropy as entropy_module
from segppo.kernels import entropy_logprobs

NEG_INF = float("-inf")
# Float32 absolute tolerances per path. The Triton kernel accumulates relative to the running max;
# the torch reference computes logZ - Σp·x (and autograd through it) at the scale of the logits,
# which cancels to a few 1e-5 when |logits| ~ 10-20 and the entropy is small.
ATOL = {"triton": 1e-5, "torch": 1e-5}
GRAD_ATOL = {"triton": 1e-6, "torch": 1e-6}


def oracle(logits, targets=None, temperature=1.0):
    """Float64 entropy and target log-probs; differentiable, and finite-gradient at -inf entries."""
    x = logits.double() / temperature
    logp = x.log_softmax(-1)
    # Double where: -inf·0 would be NaN in the value and in the gradient of the unselected branch.
    masked = x == NEG_INF
    entropy = -(logp.exp() * torch.where(masked, torch.zeros_like(logp), logp)).sum(-1)
    if targets is None:
        return entropy, None
    return entropy, logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def segppo_fn(logits, targets, temperature):
    return entropy_logprobs(logits, targets, temperature=temperature)


def make(shape, dtype=torch.float32, scale=3.0, seed=0, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=gen, device=device)
    return logits, targets


def assert_close(actual, expected, rtol, atol):
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, equal_nan=True)


@pytest.fixture
def small_blocks(monkeypatch):
    """Force several vocabulary blocks on small V so the online rescaling runs on every row."""
    monkeypatch.setattr(entropy_module, "MAX_BLOCK_V", 16)


SHAPES = [(1, 1), (1, 7), (3, 37), (5, 100), (17, 1000), (2, 3, 129), (4, 5000), (0, 11), (2, 0, 11), (13,)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_matches_float64(kernel_path, device, shape, temperature):
    logits, targets = make(shape, device=device)
    entropy, logprobs = entropy_logprobs(logits, targets, temperature=temperature)
    want_h, want_lp = oracle(logits, targets, temperature)
    assert_close(entropy, want_h, rtol=1e-5, atol=ATOL[kernel_path])
    assert_close(logprobs, want_lp, rtol=1e-5, atol=ATOL[kernel_path])


@pytest.mark.parametrize("shape", [(3, 37), (17, 100), (2, 3, 50)], ids=str)
def test_online_rescaling_across_blocks(kernel_path, device, small_blocks, shape):
    logits, targets = make(shape, device=device)
    # Rising and falling ramps move the running max in every block, or never after the first.
    ramp = torch.linspace(-20, 20, shape[-1], device=device)
    for logits_case in (logits, logits + ramp, logits - ramp):
        entropy, logprobs = entropy_logprobs(logits_case, targets, temperature=1.3)
        want_h, want_lp = oracle(logits_case, targets, 1.3)
        assert_close(entropy, want_h, rtol=1e-5, atol=ATOL[kernel_path])
        assert_close(logprobs, want_lp, rtol=1e-5, atol=ATOL[kernel_path])


def test_large_offset_keeps_entropy_accurate(kernel_path, device, small_blocks):
    # Both paths centre on the row max, so nothing of the size of the logits (~1e4) cancels.
    logits, targets = make((5, 300), device=device)
    logits = logits + 1e4
    entropy, logprobs = entropy_logprobs(logits, targets)
    want_h, want_lp = oracle(logits, targets)
    assert_close(entropy, want_h, rtol=1e-5, atol=1e-5)
    assert_close(logprobs, want_lp, rtol=1e-5, atol=1e-4)  # x_t - logZ: both ~1e4 in float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(7, 333), (3, 5000), (2, 2, 64)], ids=str)
def test_half_precision_logits(kernel_path, device, dtype, shape):
    logits, targets = make(shape, dtype=dtype, device=device)
    entropy, logprobs = entropy_logprobs(logits, targets, temperature=0.8)
    want_h, want_lp = oracle(logits, targets, 0.8)
    assert_close(entropy, want_h, rtol=2e-3, atol=2e-3)
    assert_close(logprobs, want_lp, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_output_and_grad_dtypes(kernel_path, device, dtype):
    logits, targets = make((3, 2, 40), dtype=dtype, device=device)
    logits.requires_grad_()
    entropy, logprobs = entropy_logprobs(logits, targets)
    assert entropy.dtype == logprobs.dtype == torch.float32
    assert entropy.shape == logprobs.shape == (3, 2)
    (entropy.sum() + logprobs.sum()).backward()
    assert logits.grad.dtype == dtype and logits.grad.shape == logits.shape


def test_targets_none(kernel_path, device):
    logits, _ = make((4, 3, 77), device=device)
    entropy, logprobs = entropy_logprobs(logits)
    assert logprobs is None
    assert_close(entropy, oracle(logits)[0], rtol=1e-5, atol=ATOL[kernel_path])


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the fully masked row
def test_masked_entries(kernel_path, device, small_blocks):
    V = 70
    logits, targets = make((6, V), device=device)
    logits[0, ::3] = NEG_INF  # scattered
    logits[1, :40] = NEG_INF  # the first blocks entirely masked: the running max starts at -inf
    logits[2, :] = NEG_INF
    logits[2, 5] = 1.5  # one entry left: entropy 0, its log-prob 0
    targets[2] = 5
    logits[3, 20:] = NEG_INF  # the tail masked
    logits[4, 7] = NEG_INF
    targets[4] = 7  # a masked target: log-prob -inf
    logits[5, :] = NEG_INF  # nothing left: the distribution is undefined, so NaN
    entropy, logprobs = entropy_logprobs(logits, targets)
    want_h, want_lp = oracle(logits, targets)
    assert_close(entropy[:5], want_h[:5], rtol=1e-5, atol=ATOL[kernel_path])
    assert_close(logprobs[:5], want_lp[:5], rtol=1e-5, atol=ATOL[kernel_path])
    assert entropy[2].item() == 0.0 and logprobs[2].item() == 0.0
    assert logprobs[4].item() == NEG_INF
    assert math.isnan(logprobs[5].item())
    assert math.isnan(entropy[5].item())  # a fully masked row has no distribution


def test_masked_first_block_then_very_negative_logits(kernel_path, device, small_blocks):
    """A row whose first block is all -inf and whose other logits/T lie below exp's range (~ -87).

    The running max must be the real max, not the stand-in shift used while nothing was seen;
    otherwise every exp underflows to 0 and the row comes out H = NaN, log p = +inf.
    """
    V = 50
    logits = torch.full((2, V), -200.0, device=device)
    logits[:, :16] = NEG_INF  # exactly the first block (small_blocks: BLOCK_V = 16)
    logits[0, 30] = -150.0
    logits[1, 40:] = torch.linspace(-300.0, -120.0, 10, device=device)
    targets = torch.tensor([30, 45], device=device)
    entropy, logprobs = entropy_logprobs(logits, targets)
    want_h, want_lp = oracle(logits, targets)
    assert_close(entropy, want_h, rtol=1e-5, atol=ATOL[kernel_path])
    assert_close(logprobs, want_lp, rtol=1e-5, atol=ATOL[kernel_path])
    leaf = logits.clone().requires_grad_()
    h, lp = entropy_logprobs(leaf, targets)
    (grad,) = torch.autograd.grad((h + lp).sum(), leaf)
    ref_leaf = logits.clone().requires_grad_()
    want_h, want_lp = oracle(ref_leaf, targets)
    (want_grad,) = torch.autograd.grad((want_h + want_lp).sum(), ref_leaf)
    torch.testing.assert_close(grad.double(), want_grad.double(), rtol=1e-5, atol=GRAD_ATOL[kernel_path])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_rows_give_nan(kernel_path, device, small_blocks, dtype):
    V = 50
    logits, targets = make((6, V), dtype=dtype, device=device)
    nan_at = {0: 0, 2: V - 1, 3: 23, 5: targets[5].item()}  # first, last, mid-block, the target
    for row, col in nan_at.items():
        logits[row, col] = float("nan")
    logits[3, :20] = NEG_INF  # NaN after masked blocks
    entropy, logprobs = entropy_logprobs(logits, targets)
    for row in range(6):
        if row in nan_at:
            assert math.isnan(entropy[row].item()), row
            assert math.isnan(logprobs[row].item()), row
    clean = [1, 4]
    want_h, want_lp = oracle(logits[clean], targets[clean])
    assert_close(entropy[clean], want_h, rtol=2e-5, atol=2e-5)
    assert_close(logprobs[clean], want_lp, rtol=2e-5, atol=2e-5)


def test_out_of_range_target(kernel_path, device):
    V = 40
    logits, targets = make((5, V), device=device)
    targets[1], targets[3], targets[4] = V, -1, -100
    if kernel_path == "torch":
        if device.type == "cuda":
            pytest.skip("the reference's gather would hit a device-side assert and poison the context")
        # The reference gathers; an invalid id is an indexing error there, never a silent value.
        with pytest.raises((RuntimeError, IndexError)):
            entropy_logprobs(logits, targets)
        return
    entropy, logprobs = entropy_logprobs(logits, targets)
    assert torch.isnan(logprobs[[1, 3, 4]]).all()
    good = [0, 2]
    want_h, want_lp = oracle(logits, targets.clamp(0, V - 1))
    assert_close(entropy, want_h, rtol=1e-5, atol=ATOL[kernel_path])  # entropy does not depend on targets
    assert_close(logprobs[good], want_lp[good], rtol=1e-5, atol=ATOL[kernel_path])


def test_full_llama3_vocab_bf16(kernel_path, device):
    logits, targets = make((3, 128256), dtype=torch.bfloat16, device=device)
    logits[1, 100_000:] = NEG_INF
    entropy, logprobs = entropy_logprobs(logits, targets)
    want_h, want_lp = oracle(logits, targets)
    assert_close(entropy, want_h, rtol=2e-3, atol=2e-3)
    assert_close(logprobs, want_lp, rtol=2e-3, atol=2e-3)
    # Gradients on the unmasked rows (masked ones: test_grad_with_masked_entries).
    logits, targets = logits[[0, 2]], targets[[0, 2]]
    g1, g2 = torch.randn(2).to(device), torch.randn(2).to(device)
    got = _grads(logits, targets, 1.0, g1, g2, "both", segppo_fn)
    want = _grads(logits.double(), targets, 1.0, g1.double(), g2.double(), "both", oracle)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-5)


def _grads(logits, targets, temperature, g1, g2, which, fn):
    x = logits.detach().clone().requires_grad_()
    entropy, logprobs = fn(x, targets if which != "entropy-only-no-targets" else None, temperature)
    loss = 0
    if which != "logprobs":
        loss = loss + (entropy * g1).sum()
    if which in ("both", "logprobs"):
        loss = loss + (logprobs * g2).sum()
    loss.backward()
    return x.grad


GRAD_CASES = ["both", "entropy", "logprobs", "entropy-only-no-targets"]


@pytest.mark.parametrize("which", GRAD_CASES)
@pytest.mark.parametrize("shape", [(3, 37), (2, 3, 129), (2, 5000)], ids=str)
def test_grad_fp32(kernel_path, device, shape, which):
    logits, targets = make(shape, device=device)
    gen = torch.Generator().manual_seed(1)
    g1 = torch.randn(shape[:-1], generator=gen).to(device)
    g2 = torch.randn(shape[:-1], generator=gen).to(device)
    got = _grads(logits, targets, 0.7, g1, g2, which, segppo_fn)
    want = _grads(logits.double(), targets, 0.7, g1.double(), g2.double(), which, oracle)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=GRAD_ATOL[kernel_path])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_grad_half_precision(kernel_path, device, small_blocks, dtype):
    shape = (2, 3, 100)
    logits, targets = make(shape, dtype=dtype, device=device)
    g1, g2 = torch.randn(shape[:-1]).to(device), torch.randn(shape[:-1]).to(device)
    got = _grads(logits, targets, 1.0, g1, g2, "both", segppo_fn)
    want = _grads(logits.double(), targets, 1.0, g1.double(), g2.double(), "both", oracle)
    assert got.dtype == dtype
    # The gradient is rounded to the logits' dtype (8 bits of mantissa for bf16).
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=2e-3)


def test_grad_with_masked_entries(kernel_path, device, small_blocks):
    logits, targets = make((4, 60), device=device)
    logits[0, ::2] = NEG_INF
    logits[1, :35] = NEG_INF
    targets[0], targets[1] = 13, 40  # unmasked: d logp/dx at the target is 1 - p even at -inf
    g1, g2 = torch.randn(4).to(device), torch.randn(4).to(device)
    got = _grads(logits, targets, 1.2, g1, g2, "both", segppo_fn)
    want = _grads(logits.double(), targets, 1.2, g1.double(), g2.double(), "both", oracle)
    assert torch.isfinite(got).all()
    assert (got[logits == NEG_INF] == 0).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=GRAD_ATOL[kernel_path])


def test_non_contiguous_inputs(kernel_path, device):
    base, _ = make((5, 4, 90), device=device)
    cases = {
        "row stride > V": base[..., 10:74],  # rows stay a strided view
        "leading dims not mergeable": base[..., 10:74].transpose(0, 1),
        "column stride != 1": make((5, 64, 4), device=device)[0].transpose(-1, -2),
    }
    for name, view in cases.items():
        targets = torch.randint(0, 64, view.shape[:-1], device=device)
        want_h, want_lp = oracle(view, targets)
        entropy, logprobs = entropy_logprobs(view, targets)
        assert_close(entropy, want_h, rtol=1e-5, atol=ATOL[kernel_path])
        assert_close(logprobs, want_lp, rtol=1e-5, atol=ATOL[kernel_path])
        got = _grads(view, targets, 1.0, 1.0, 1.0, "both", segppo_fn)
        want = _grads(view.double(), targets, 1.0, 1.0, 1.0, "both", oracle)
        assert got.shape == view.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=GRAD_ATOL[kernel_path], msg=name)


def test_no_grad_and_detached(kernel_path, device):
    logits, targets = make((3, 20), device=device)
    with torch.no_grad():
        entropy, logprobs = entropy_logprobs(logits.requires_grad_(), targets)
    assert not entropy.requires_grad and not logprobs.requires_grad
    entropy, logprobs = entropy_logprobs(logits.detach(), targets)
    assert not entropy.requires_grad


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"logits": torch.zeros(2, 5, dtype=torch.long)}, "logits"),
        ({"logits": torch.zeros(2, 5, dtype=torch.bool)}, "logits"),
        ({"logits": torch.zeros(2, 0)}, "logits"),
        ({"logits": torch.zeros(())}, "logits"),
        ({"targets": torch.zeros(3, dtype=torch.long)}, "targets"),
        ({"targets": torch.zeros(2, 1, dtype=torch.long)}, "targets"),
        ({"targets": torch.zeros(2)}, "targets"),
        ({"targets": torch.zeros(2, dtype=torch.bool)}, "targets"),
        ({"targets": torch.zeros(2, dtype=torch.long, device="meta")}, "targets"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
    ],
)
def test_argument_errors(kernel_path, kwargs, argument):
    args = {"logits": torch.zeros(2, 5), "targets": torch.zeros(2, dtype=torch.long), "temperature": 1.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        entropy_logprobs(args["logits"], args["targets"], temperature=args["temperature"])


@pytest.mark.gpu
class TestCuda:
    """Full-size checks on a GPU: accuracy at scale and no hidden float32 copy of the logits."""

    @pytest.fixture(autouse=True)
    def _triton(self, monkeypatch):
        monkeypatch.setenv("SEGPPO_KERNELS", "triton")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
    def test_large_matches_float64(self, dtype):
        logits, targets = make((2048, 128256), dtype=dtype, device="cuda")
        entropy, logprobs = entropy_logprobs(logits, targets, temperature=0.9)
        for rows in torch.arange(2048, device="cuda").split(256):  # bounds the float64 oracle
            want_h, want_lp = oracle(logits[rows], targets[rows], 0.9)
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            assert_close(entropy[rows], want_h, rtol=tol, atol=tol)
            assert_close(logprobs[rows], want_lp, rtol=tol, atol=tol)

    def test_grad_large_bf16(self):
        logits, targets = make((64, 128256), dtype=torch.bfloat16, device="cuda")
        g1, g2 = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
        got = _grads(logits, targets, 1.0, g1, g2, "both", segppo_fn)
        want = _grads(logits.double(), targets, 1.0, g1.double(), g2.double(), "both", oracle)
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-4)

    def test_forward_allocates_only_outputs(self):
        logits, targets = make((8192, 128256), dtype=torch.bfloat16, device="cuda")
        entropy_logprobs(logits, targets)  # compile and warm the allocator outside the window
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        entropy, logprobs = entropy_logprobs(logits, targets)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        assert extra <= 0.01 * logits.numel() * logits.element_size(), extra

    def test_backward_allocates_only_the_grad(self):
        logits, targets = make((4096, 128256), dtype=torch.bfloat16, device="cuda")
        logits.requires_grad_()
        for _ in range(2):  # the first round compiles
            logits.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            entropy, logprobs = entropy_logprobs(logits, targets)
            (entropy.sum() + logprobs.sum()).backward()
            torch.cuda.synchronize()
        grad_bytes = logits.numel() * logits.element_size()
        extra = torch.cuda.max_memory_allocated() - before
        assert extra <= 1.01 * grad_bytes, extra


# The torch reference on its own: chunked forward, recomputing backward, float32 only per chunk.


def test_reference_large_offset_keeps_entropy_accurate(monkeypatch):
    # The reference centres on the row max (p·(x − max), logZ − max), so it keeps the Triton
    # kernel's accuracy at large offsets too.
    monkeypatch.setenv("SEGPPO_KERNELS", "torch")
    logits, targets = make((5, 300))
    for offset in (1e4, -1e4):
        shifted = logits + offset
        entropy, logprobs = entropy_logprobs(shifted, targets, temperature=0.9)
        want_h, want_lp = oracle(shifted, targets, 0.9)
        assert_close(entropy, want_h, rtol=1e-5, atol=1e-5)
        assert_close(logprobs, want_lp, rtol=1e-5, atol=1e-5)
        got = _grads(shifted, targets, 0.9, 1.0, 1.0, "both", segppo_fn)
        want = _grads(shifted.double(), targets, 0.9, 1.0, 1.0, "both", oracle)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=GRAD_ATOL["torch"])


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", GRAD_CASES)
def test_reference_across_chunks(monkeypatch, dtype, which):
    """Several row chunks, with masked and NaN rows in some chunks only."""
    from segppo.kernels import reference

    monkeypatch.setenv("SEGPPO_KERNELS", "torch")
    V = 45
    monkeypatch.setattr(reference, "_ENTROPY_CHUNK_ELEMENTS", 3 * V + 7)  # 3 rows per chunk
    logits, targets = make((4, 5, V), dtype=dtype)
    rows = logits.view(-1, V)
    rows[1, ::4] = NEG_INF  # chunk 0
    rows[7, 30:] = NEG_INF  # chunk 2
    rows[8, :] = NEG_INF  # chunk 2: fully masked
    rows[13, :] = NEG_INF  # chunk 4: a single entry left
    rows[13, 9] = 2.0
    rows[17, 3] = float("nan")  # chunk 5
    flat_targets = targets.view(-1)
    flat_targets[1], flat_targets[7], flat_targets[13] = 2, 11, 9  # unmasked targets
    entropy, logprobs = entropy_logprobs(logits, targets, temperature=0.7)
    want_h, want_lp = oracle(logits, targets, 0.7)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    flat_h, flat_lp = entropy.view(-1), logprobs.view(-1)
    assert math.isnan(flat_h[8].item()) and math.isnan(flat_lp[8].item())
    assert math.isnan(flat_h[17].item()) and math.isnan(flat_lp[17].item())
    assert flat_h[13].item() == 0.0
    good = [i for i in range(20) if i not in (8, 17)]
    assert_close(flat_h[good], want_h.view(-1)[good], rtol=tol, atol=tol)
    assert_close(flat_lp[good], want_lp.view(-1)[good], rtol=tol, atol=tol)

    clean = logits.view(-1, V)[good].view(2, 9, V)  # gradients need rows with a distribution
    clean_targets = targets.view(-1)[good].view(2, 9)
    g1, g2 = torch.randn(2, 9), torch.randn(2, 9)
    got = _grads(clean, clean_targets, 0.7, g1, g2, which, segppo_fn)
    want = _grads(clean.double(), clean_targets, 0.7, g1.double(), g2.double(), which, oracle)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got[clean == NEG_INF] == 0).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=GRAD_ATOL["torch"])
    else:
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=2e-3)


def test_saves_no_float32_copy(kernel_path, device):
    """What the graph keeps for the backward: the logits themselves, plus O(rows) numbers."""
    logits, targets = make((6, 4, 300), dtype=torch.bfloat16, device=device)
    logits.requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        entropy, logprobs = entropy_logprobs(logits, targets)
    rows = logits.shape[0] * logits.shape[1]
    for tensor in saved:
        if tensor.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
            continue  # the logits (or a view of them): no copy
        assert tensor.numel() <= 4 * rows, (tensor.dtype, tuple(tensor.shape))
    (entropy.sum() + logprobs.sum()).backward()
    assert logits.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("V, lane_axis", [(64, 1), (63, 0)])
def test_both_lane_tiles(kernel_path, device, small_blocks, dtype, V, lane_axis):
    """The forward tiles 16-byte-aligned rows by vector (a lane = consecutive logits) and other
    rows by thread (a lane = a column); both must give the same answers, on every kind of row."""
    logits, targets = make((6, V), dtype=dtype, device=device)
    ramp = torch.linspace(-20, 20, V, device=device).to(dtype)
    logits[1] += ramp  # the max moves in every block
    logits[2] -= ramp  # the max is in the first block
    logits[3, :16] = NEG_INF  # a masked first block
    logits[4, ::5] = NEG_INF
    logits[5] = logits[5] + 1e3
    if kernel_path == "triton":
        assert entropy_module._lane_tile(logits, 16, 1)["LANE_AXIS"] == lane_axis
    want_h, want_lp = oracle(logits, targets, 0.9)
    entropy, logprobs = entropy_logprobs(logits, targets, temperature=0.9)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert_close(entropy, want_h, rtol=tol, atol=tol)
    assert_close(logprobs, want_lp, rtol=tol, atol=tol * 10)  # log p at |x| ~ 1e3
    g1, g2 = torch.randn(6).to(device), torch.randn(6).to(device)
    got = _grads(logits, targets, 0.9, g1, g2, "both", segppo_fn)
    want = _grads(logits.double(), targets, 0.9, g1.double(), g2.double(), "both", oracle)
    torch.testing.assert_close(got.double(), want, rtol=max(tol, 1e-2 * (dtype != torch.float32)), atol=tol)


def test_lowest_float32_logits_are_not_masked(kernel_path, device, small_blocks):
    """torch.finfo(float32).min is a common "banned" value; unlike -inf it is a real logit."""
    lowest = torch.finfo(torch.float32).min
    logits, targets = make((3, 40), device=device)
    logits[0] = lowest  # every entry equal: the uniform distribution
    logits[1, :30] = lowest  # banned entries next to real ones: probability 0
    logits[2, 20:] = lowest
    targets[0] = 3
    entropy, logprobs = entropy_logprobs(logits, targets)
    want_h, want_lp = oracle(logits, targets)
    assert_close(entropy, want_h, rtol=1e-5, atol=ATOL[kernel_path])
    assert_close(logprobs, want_lp, rtol=1e-5, atol=ATOL[kernel_path])
    assert entropy[0].item() == pytest.approx(math.log(40), abs=1e-5)
