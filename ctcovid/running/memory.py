"""Giving freed memory back to the operating system between the stages of a scan.

glibc's ``malloc`` keeps freed blocks below its mmap threshold (up to 32 MB: the networks' activations,
NumPy/SciPy temporaries) in its arenas for reuse, so after the slice-level networks and the mask clean-up
of a 300-slice scan a process held ~0.4 GB it no longer used, which the next stage's large allocations
then came on top of (issue 9: with this, the scan handed over and the stacks built in pieces, the peak RSS
of a 300-slice scan fell from 4.4 to 3.2 GB, ``benchmarks/results/ct_pipeline.json``).
``malloc_trim(0)`` hands such free pages back; it takes well under a millisecond here. No library of
ours offers this (PyTorch and NumPy leave the C allocator alone), hence the few lines of ``ctypes``.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the process's own C library (glibc; musl has none)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Return the C heap's free pages to the operating system (glibc ``malloc_trim(0)``).

    Live memory is untouched; only what was already freed stops counting in the resident set. Returns
    whether the call is available (Linux with glibc); elsewhere it does nothing.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
