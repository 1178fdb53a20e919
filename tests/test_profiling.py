"""The measuring tools of the benchmarks (:mod:`ctcovid.profiling`): they must count what they claim."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ctcovid.profiling import PeakMemory, count_flops, describe_machine, matmul_throughput, rss_bytes


def test_count_flops_of_known_layers():
    linear = nn.Linear(8, 4)
    assert count_flops(linear, torch.randn(3, 8)) == 2 * 3 * 8 * 4  # one multiply-add = 2 FLOPs
    conv = nn.Conv2d(2, 5, kernel_size=3, padding=1, bias=False)
    # every output pixel of every output channel: 2 * in_channels * 3 * 3
    assert count_flops(conv, torch.randn(1, 2, 6, 6)) == 2 * 2 * 9 * 5 * 36

    def forward_backward(input_grad: bool):
        linear(torch.randn(3, 8, requires_grad=input_grad)).sum().backward()

    # backward of a linear layer: the weight's gradient, and the input's when it needs one (as Grad-CAM's
    # input does), each as costly as the forward
    assert count_flops(forward_backward, False) == 2 * (2 * 3 * 8 * 4)
    assert count_flops(forward_backward, True) == 3 * (2 * 3 * 8 * 4)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_per_span_resets_between_spans():
    mem = PeakMemory("cpu")
    assert mem.resettable
    base = rss_bytes()
    mem.start("big")
    block = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB of float32, touched
    del block
    mem.start("small")
    small = torch.ones(2**20)  # 4 MiB
    del small
    mem.stop()
    big, quiet = mem.peaks["big"]["rss_bytes"], mem.peaks["small"]["rss_bytes"]
    assert big - base > 200 * 2**20
    assert quiet < big - 200 * 2**20  # the second span does not inherit the first one's peak
    assert mem.overall()["rss_bytes"] == big and mem.peaks["big"]["cuda_bytes"] is None


def test_matmul_throughput_and_machine_description():
    flops = matmul_throughput("cpu", torch.float32, n=128, seconds=0.05)
    assert math.isfinite(flops) and flops > 1e6
    info = describe_machine("cpu")
    assert info["usable_cores"] >= 1 and info["torch_threads"] >= 1 and info["torch"] == torch.__version__


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read the resident set")
def test_release_free_memory_returns_freed_heap_pages():
    """Small freed blocks stay in glibc's heap (resident) until ``malloc_trim`` hands them back."""
    import numpy as np

    from ctcovid.running.memory import _malloc_trim, release_free_memory

    if _malloc_trim() is None:
        pytest.skip("no malloc_trim in this C library (not glibc)")
    release_free_memory()
    blocks = [np.ones(16_000) for _ in range(4_000)]  # 128 kB each, ~0.5 GB below the mmap threshold...
    keep = blocks[-1]  # ...the last one pinned at the heap's top, so free() alone cannot shrink the heap
    del blocks
    held = rss_bytes()
    assert release_free_memory() is True
    released = held - rss_bytes()
    assert released > 0.3e9, f"only {released / 1e6:.0f} MB of ~500 MB freed blocks returned"
    assert keep.sum() == 16_000  # live memory untouched
