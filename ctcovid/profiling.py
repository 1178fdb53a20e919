"""Measuring what a run costs: peak memory per stage, network FLOPs, the machine's matmul throughput.

Used by ``benchmarks/bench_ct_pipeline.py`` to put each pipeline stage next to its floor (FLOPs divided by
the throughput the machine actually reaches on a large matrix product) and to report peak memory per stage.
Nothing here is timed in tests; tests check that the counters count.

Peak resident memory per stage uses Linux's ``/proc/self/status`` high-water mark (``VmHWM``), reset by
writing ``5`` to ``/proc/self/clear_refs`` at each stage start -- there is no portable API for a
resettable peak RSS (``resource.getrusage`` only gives the process-lifetime peak, used as the fallback).
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PeakMemory", "count_flops", "describe_machine", "matmul_throughput", "rss_bytes", "sync_device"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def sync_device(device: torch.device | str | None) -> None:
    """Wait for the work queued on a CUDA ``device`` (a no-op on CPU or ``None``), so wall-clock times are true."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (0 where ``/proc`` is unavailable)."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def _reset_peak_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: lifetime peak (kilobytes on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if platform.system() == "Darwin" else peak * 1024)
    return kib * 1024


class PeakMemory:
    """Peak resident memory (and CUDA memory) of each labelled span of a run.

    Call :meth:`start` with a label at the start of each span (the previous span ends there) and
    :meth:`stop` at the end; :attr:`peaks` then maps each label to
    ``{"rss_bytes": peak RSS, "cuda_bytes": peak CUDA allocation or None}``. A label used twice keeps the
    larger peak. ``resettable`` is false where the RSS peak cannot be reset (then each span reports the
    peak since the process started, an upper bound).

    Args:
        device: CUDA peaks are tracked when this is a CUDA device.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peaks: dict[str, dict[str, int | None]] = {}
        self.resettable = _reset_peak_rss()
        self._label: str | None = None

    def _cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def start(self, label: str) -> None:
        self.stop()
        self._label = label
        _reset_peak_rss()
        if self._cuda():
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> None:
        if self._label is None:
            return
        cuda = None
        if self._cuda():
            torch.cuda.synchronize(self.device)
            cuda = int(torch.cuda.max_memory_allocated(self.device))
        rss = _peak_rss_bytes()
        old = self.peaks.get(self._label)
        if old is not None:
            rss = max(rss, int(old["rss_bytes"] or 0))
            cuda = None if cuda is None else max(cuda, int(old["cuda_bytes"] or 0))
        self.peaks[self._label] = {"rss_bytes": rss, "cuda_bytes": cuda}
        self._label = None

    def overall(self) -> dict[str, int | None]:
        """The largest peak over all spans."""
        rss = max((int(p["rss_bytes"] or 0) for p in self.peaks.values()), default=0)
        cudas = [int(p["cuda_bytes"]) for p in self.peaks.values() if p["cuda_bytes"] is not None]
        return {"rss_bytes": rss, "cuda_bytes": max(cudas) if cudas else None}


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Floating-point operations of ``fn(*args, **kwargs)``, counted by :class:`torch.utils.flop_counter.FlopCounterMode`.

    Counts matrix products and convolutions (2 FLOPs per multiply-add), forward and -- if ``fn`` calls
    ``backward`` -- backward; element-wise work (activations, norms, pooling) is not counted, so this is
    the compute floor, not the whole work.
    """
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def matmul_throughput(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    n: int = 2048,
    seconds: float = 1.0,
) -> float:
    """Sustained FLOP/s of an ``n x n`` by ``n x n`` matrix product on ``device`` in ``dtype``.

    The best of repeated runs over about ``seconds`` after one warm-up product: the throughput a
    well-tuned kernel reaches on this machine, the yardstick for the floors of
    :func:`count_flops`.
    """
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dev, dtype)
    b = torch.randn(n, n, generator=gen).to(dev, dtype)

    with torch.inference_mode():
        a @ b
        sync_device(dev)
        best = float("inf")
        end = time.perf_counter() + seconds
        while True:
            t = time.perf_counter()
            a @ b
            sync_device(dev)
            best = min(best, time.perf_counter() - t)
            if time.perf_counter() > end:
                break
    return 2.0 * n**3 / best


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def describe_machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a benchmark ran on: CPU model, usable cores, torch threads, RAM, load, GPU, library versions."""
    import monai

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    mem_kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    dev = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "usable_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "ram_gib": None if mem_kib is None else round(mem_kib / 2**20, 1),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "device": str(dev),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info
