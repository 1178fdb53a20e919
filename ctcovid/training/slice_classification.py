"""Per-slice classification of a 3D volume (the lung-slice filter bundle's inference).

MONAI's ``SliceInferer`` stitches spatial outputs back into a volume; a slice *classifier* gives one
vector per slice, which it cannot stitch. :class:`SliceClassifierInferer` runs the network over the
slices in chunks and returns ``(B, num_classes, Z)``; :class:`SliceProbabilityWriter` writes one CSV per
scan with the lung probability of each slice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer
from monai.utils import CommonKeys

from ctcovid.training.nifti_writer import set_default_permissions

__all__ = ["SliceClassifierInferer", "SliceProbabilityWriter"]


class SliceClassifierInferer(Inferer):
    """Apply a 2D classifier to every slice along the last spatial axis of a volume batch.

    Args:
        sw_batch_size: slices per forward pass.

    ``__call__(inputs, network)``: ``(B, C, H, W, Z)`` -> ``(B, num_classes, Z)`` (whatever the network
    returns per ``(N, C, H, W)`` slice batch, stacked along a last axis).
    """

    def __init__(self, sw_batch_size: int = 16) -> None:
        super().__init__()
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.sw_batch_size = int(sw_batch_size)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if inputs.ndim != 5:
            raise ValueError(f"expected a (B, C, H, W, Z) batch, got shape {tuple(inputs.shape)}")
        outs = []
        for b in range(inputs.shape[0]):
            slices = inputs[b].permute(3, 0, 1, 2)  # (Z, C, H, W)
            chunks = [
                network(slices[i : i + self.sw_batch_size], *args, **kwargs)
                for i in range(0, slices.shape[0], self.sw_batch_size)
            ]
            outs.append(torch.cat(chunks, dim=0).transpose(0, 1))  # (num_classes, Z)
        return torch.stack(outs)


class SliceProbabilityWriter:
    """Writes ``<output_dir>/<scan>_slices.csv`` (slice, lung_probability, lung) for every scan an engine sees.

    Reads the decollated ``pred`` of each item (``(num_classes, Z)`` probabilities, class 1 = lung) and the
    scan path from ``image.meta["filename_or_obj"]``. Files are written atomically.

    Args:
        output_dir: destination folder.
        threshold: a slice is "lung" when its probability is at least this.
        lung_index: output channel of the lung class.
    """

    def __init__(self, output_dir: str | os.PathLike, threshold: float = 0.5, lung_index: int = 1) -> None:
        self.output_dir = Path(output_dir)
        self.threshold = float(threshold)
        self.lung_index = int(lung_index)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from ctcovid.io.atomic import write_csv_atomic

        for item in engine.state.output:
            prob = torch.as_tensor(item[CommonKeys.PRED])[self.lung_index].detach().cpu().float()
            src = str(item[CommonKeys.IMAGE].meta.get("filename_or_obj", "scan"))
            name = os.path.basename(src.rstrip("/\\"))
            for ext in (".nii.gz", ".nii"):
                if name.endswith(ext):
                    name = name[: -len(ext)]
            rows = [
                {"slice": k, "lung_probability": round(float(p), 6), "lung": int(float(p) >= self.threshold)}
                for k, p in enumerate(prob)
            ]
            path = write_csv_atomic(
                rows, ["slice", "lung_probability", "lung"], self.output_dir / f"{name}_slices.csv"
            )
            set_default_permissions(path)
