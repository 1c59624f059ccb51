import sys
from pathlib import Path

import pytest
import torch

from segppo.host_memory import _glibc, release_freed_host_memory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _glibc() is None, reason="glibc's malloc_trim"
)
MiB = 2**20


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def test_freed_heap_pages_go_back_to_the_kernel():
    # A freed 8 MiB mmapped tensor raises glibc's mmap threshold to 8 MiB, so the 1 MiB tensors after
    # it come from the heap, as a PPO step's activations do after its first update. Freed below a
    # live one, they stay resident until trimmed.
    big = torch.ones(8 * MiB // 4)
    del big
    chunks = [torch.ones(MiB // 4 - 64) for _ in range(256)]
    top = chunks[-1]
    del chunks
    resident = _rss_anon()
    assert release_freed_host_memory()
    assert resident - _rss_anon() > 128 * MiB
    assert top.sum().item() == top.numel()  # the live block is untouched
