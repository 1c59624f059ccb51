"""Shared test set-up.

Without CUDA, the Triton path runs under the interpreter: TRITON_INTERPRET must be set before
triton is first imported, which is why it is set here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from segppo.kernels._dispatch import HAS_TRITON  # noqa: E402

# One thread: the tests' tensors are tiny, and on a shared machine a second OpenMP thread that
# waits for a busy core can make each op a hundred times slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(params=["torch", "triton"])
def kernel_path(request, monkeypatch):
    """Run a test once on the torch reference path and once on the Triton path."""
    if request.param == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("SEGPPO_KERNELS", request.param)
    return request.param


@pytest.fixture
def device():
    """Where kernel tests put their tensors: CUDA when present, else CPU (interpreted Triton)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A saved random-weight Llama-style causal LM with the tiny tokenizer."""
    from tiny import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def preferences_file(tmp_path_factory):
    from tiny import write_preferences

    return write_preferences(tmp_path_factory.mktemp("data") / "prefs.jsonl")


# The real-model tier (`-m real`): SmolLM2-135M-Instruct, converted once into the user's cache
# (segppo.demo.smollm2), and one small preference data set of its own samples, shared by every test.


@pytest.fixture(scope="session")
def real_model_dir():
    from segppo.demo.smollm2 import DownloadError, smollm2_folder

    try:
        return smollm2_folder(log=lambda message: None)
    except DownloadError as err:
        pytest.skip(f"the real model cannot be downloaded here: {err}")


@pytest.fixture(scope="session")
def real_data(real_model_dir, tmp_path_factory):
    from segppo.demo.real_data import make_real_data

    return make_real_data(
        tmp_path_factory.mktemp("real"),
        real_model_dir,
        pairs=12,
        eval_pairs=4,
        ppo_prompts=8,
        heldout_prompts=4,
        max_new_tokens=24,
        batch_size=32,
    )
