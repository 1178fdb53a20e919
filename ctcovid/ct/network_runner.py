"""How the CT stages run their networks: device, arithmetic (fp32 / bf16 autocast), memory format and
slice batches. One :class:`NetworkRunner` per pipeline, shared by its stages."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_BATCH_SIZE", "PRECISIONS", "NetworkRunner"]

#: Arithmetic of the network forward passes: ``"fp32"``, or ``"bf16"`` autocast (CPU with AVX-512 BF16 /
#: AMX, CUDA from Ampere on): the networks ran 1.3-2.2x faster on a 2-core AVX-512 BF16 CPU, whole scans
#: 1.1-2.1x; see the README performance section for how much the outputs move.
PRECISIONS = ("fp32", "bf16")

#: Slices per forward pass when ``batch_size`` is not given, by device type and precision: measured
#: fastest per slice (benchmarks/results/ct_pipeline.json, two sweeps on a 2-core CPU: in fp32 ResNeXt-50
#: and the Attention U-Net run best at 2-8 and up to 2.5x slower per slice at 32; in bf16 at 8, ~15 %
#: faster than at 4). GPUs need large batches to fill.
DEFAULT_BATCH_SIZE = {"cpu": {"fp32": 4, "bf16": 8}, "cuda": {"fp32": 32, "bf16": 32}}


class NetworkRunner:
    """Device, precision, batch size and per-stage memory format of a pipeline's forward passes.

    Args:
        device: where the networks live.
        precision: one of :data:`PRECISIONS`.
        batch_size: slices per forward pass of the slice-level stages; ``None``: :data:`DEFAULT_BATCH_SIZE`.
        channels_last: per model key, whether its network (and so its inputs) use channels-last memory.
    """

    def __init__(
        self,
        device: torch.device,
        precision: str = "fp32",
        batch_size: int | None = None,
        channels_last: dict[str, bool] | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision 'bf16' is not supported on {torch.cuda.get_device_name(device)}")
        self.device = device
        self.precision = precision
        self.batch_size = int(batch_size or DEFAULT_BATCH_SIZE.get(device.type, {}).get(precision, 4))
        self.channels_last = dict(channels_last or {})

    def autocast(self):
        """The forward passes' arithmetic context (:data:`PRECISIONS`)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def network_input(self, model_key: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the device, in the memory format of ``model_key``'s network."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last.get(model_key):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def slice_batches(
        self, image: torch.Tensor, size: tuple[int, int], model_key: str
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, batch)``: ``batch`` is ``(B, 1, H, W)`` slices of the ``(1, X, Y, Z)`` ``image``
        from slice ``start`` on, resized (bilinear) to ``size``, on the device."""
        vol = image[0]  # (X, Y, Z)
        for start in range(0, vol.shape[-1], self.batch_size):
            chunk = vol[:, :, start : start + self.batch_size].permute(2, 0, 1)[:, None]  # (B, 1, X, Y)
            chunk = chunk.to(self.device, non_blocking=True)
            if tuple(chunk.shape[-2:]) != size:
                chunk = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)
            yield start, self.network_input(model_key, chunk)
