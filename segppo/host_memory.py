"""Host memory that the C allocator keeps after PyTorch frees it.

glibc serves an allocation below its mmap threshold from its heap, and a freed mmapped chunk raises
that threshold to the chunk's size (up to 32 MiB on 64-bit). After the first PPO update, the
activations and gradients of a model come from the heap; freed between steps, they stay resident
wherever a live block sits above them, and the next step's differently shaped tensors do not
always fit in the holes. On SmolLM2-135M (benchmarks/bench_ppo_memory.py, RESULTS.md) the RSS grew
by 1.8 GB over steps 3-4 with nothing new held. `malloc_trim(0)` hands the free pages of every
arena back to the kernel (madvise), which the trainer does once per step: a few milliseconds.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other C libraries: nothing to trim this way
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_freed_host_memory() -> bool:
    """Return the allocator's free pages to the kernel; False where the C library cannot."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
