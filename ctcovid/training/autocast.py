"""Mixed precision for MONAI's engines on any device.

MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` ``amp=True`` enters ``torch.autocast("cuda")`` only, so on
a CPU (AVX-512 BF16 / AMX: a training step of the lung U-Net measured 0.48 s fp32 vs 0.33 s bf16, both
channels-last) they run fp32. :class:`AutocastModule` runs the wrapped network's forward under
``torch.autocast`` of the input's device type and returns float32, so the loss and metrics stay fp32.
Checkpoints should save the wrapped ``module`` (plain state-dict keys).

bf16 only pays on hardware that has it: on a CPU without AVX-512 BF16 or AMX (e.g. an AVX2-only AMD EPYC) a
ResNet-18 training step on 16 images at 224x224 took 22-25 s under bf16 autocast against 1.7 s in fp32, because
the bf16 kernels are emulated. The training configs therefore ask :func:`default_precision` instead of fixing
``"bf16"``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AutocastModule", "autocast_network", "default_precision", "native_bf16"]


class AutocastModule(nn.Module):
    """``module`` with its forward under ``torch.autocast(device_type=<input device>, dtype=dtype)``.

    Args:
        module: the network.
        dtype: autocast dtype (bfloat16 works on CPU and recent GPUs without a grad scaler).

    Input / output: whatever ``module`` takes; floating outputs come back as float32.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, x: torch.Tensor, *args, **kwargs):
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            out = self.module(x, *args, **kwargs)
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out


def autocast_network(network: nn.Module, precision: str = "fp32") -> nn.Module:
    """``network`` itself for ``"fp32"``, wrapped in :class:`AutocastModule` for ``"bf16"``/``"fp16"``."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "fp32":
        return network
    if precision not in dtypes:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return AutocastModule(network, dtypes[precision])


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX-512 BF16 or
    AMX tiles (torch has no public query for the CPU; its private probes are used and a missing one means no)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


def default_precision(device: torch.device | str = "cpu") -> str:
    """Training arithmetic for ``device``: ``"bf16"`` on a CPU with native bf16, else ``"fp32"``.

    On CUDA this is ``"fp32"`` so the bundle configs' ``amp`` (MONAI's fp16 autocast with a grad scaler) applies.
    """
    device = torch.device(device)
    return "bf16" if device.type == "cpu" and native_bf16(device) else "fp32"
