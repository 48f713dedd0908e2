"""Host-process settings that make XLA:CPU steps faster.

XLA:CPU allocates the temporary buffers of a compiled program with the C library's ``malloc``
on every call. glibc serves large requests with fresh ``mmap`` pages and hands freed memory back
to the kernel, so every step of a small model page-faults its activations in again: on the 2-core
machines of this project that cost the MNIST CNN's DP step about a third of its time (ghost
clipping builds patch matrices of a few MB per layer). `tune_host_allocator` asks glibc to serve
such requests from its heap and to keep freed memory, so the buffers of one step are reused by
the next, the way TCMalloc-style allocators behave. The process then keeps its peak host memory
instead of returning it between steps.

The CLI (``python -m dpft``) and the benchmarks call it at start-up; library users may call it
themselves. ``DPFT_TUNE_MALLOC=0`` turns it off. It does nothing off Linux/glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["tune_host_allocator"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def tune_host_allocator(
    mmap_threshold: int = 1 << 30,
    trim_threshold: int = 2**31 - 1,
    top_pad: int = 1 << 28,
) -> bool:
    """Keep freed host memory for reuse (glibc ``mallopt``); returns whether it was applied.

    Args:
      mmap_threshold: requests below this many bytes come from the heap, not from fresh pages.
      trim_threshold: free memory at the top of the heap is returned to the kernel only above
        this many bytes.
      top_pad: extra bytes obtained whenever the heap grows.
    """
    if os.environ.get("DPFT_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    settings = (
        (_M_MMAP_THRESHOLD, mmap_threshold),
        (_M_TRIM_THRESHOLD, trim_threshold),
        (_M_TOP_PAD, top_pad),
    )
    # mallopt takes a C int: values are capped at 2**31 - 1.
    return all(
        mallopt(option, ctypes.c_int(min(value, 2**31 - 1))) == 1 for option, value in settings
    )
