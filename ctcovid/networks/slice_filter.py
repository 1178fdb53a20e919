"""Lung-slice filter: a 2D classifier telling lung slices from non-lung slices of a CT scan.

After the CNR-IEMN COV19D pipeline: a ResNeXt-50 (32x4d) judges each axial slice on its own; the slices
it calls "lung" are stacked into the volumes the detection and severity ensembles see.
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn

from .factory import register_network

__all__ = ["LungSliceFilter"]


@register_network("lung_slice_filter")
class LungSliceFilter(nn.Module):
    """Per-slice lung / non-lung classifier on a timm backbone (never pretrained-downloaded).

    Args:
        in_channels: channels of one slice image (1 for a CT slice).
        num_classes: output classes; 2 = (non-lung, lung), class 1 is "lung".
        backbone: timm model name; the paper's is ``"resnext50_32x4d"``. Built with ``pretrained=False``.

    Input: ``(B, in_channels, H, W)`` slices, trained at 224x224 (any size >= 32 works).
    Output: ``(B, num_classes)`` logits; ``softmax(...)[:, 1]`` is the per-slice lung probability that
    :class:`ctcovid.transforms.SelectLungSlices` thresholds.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, backbone: str = "resnext50_32x4d") -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.backbone = timm.create_model(
            backbone, pretrained=False, in_chans=in_channels, num_classes=num_classes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)
