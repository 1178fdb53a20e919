"""V-BreathNet: a light CNN for 3-class chest X-ray classification (COVID-19, normal, pneumonia).

Five blocks of ``Conv3x3 -> BatchNorm -> ReLU -> MaxPool(2) -> Dropout`` whose filter counts go
128 -> 64 -> 32 -> 64 -> 128 (the "V"), then a 512-unit dense layer and a 3-class output (softmax over the
logits is applied by the bundle's post-processing and by :func:`torch.softmax` at inference; the network
returns logits so that the cross-entropy loss stays numerically stable).

Between the last block and the dense layer, an adaptive average pool to a fixed ``pooled_size`` grid
(3x3 by default) makes the parameter count independent of the input size (about 0.78 M parameters for a
grey input) and lets any input of at least 32x32 through; flattening the raw 4x4 map of a 128x128 input would
put 1 M weights in the dense layer alone. At the bundle's 96x96 input the pool is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .factory import register_network

__all__ = ["VBreathNet", "VBREATHNET_CLASSES"]

#: Class order of the bundle.
VBREATHNET_CLASSES = ("COVID-19", "normal", "pneumonia")


class _VBlock(nn.Sequential):
    """``Conv3x3 (same padding) -> BN -> ReLU -> MaxPool(2) -> Dropout``: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Dropout(dropout),
        )


@register_network("vbreathnet")
class VBreathNet(nn.Module):
    """V-shaped light CNN.

    Args:
        in_channels: image channels (1 for a grey radiograph).
        num_classes: outputs (3: COVID-19, normal, pneumonia).
        filters: filter count of each block (the V: 128, 64, 32, 64, 128).
        dense_units: units of the hidden dense layer (512).
        dropout: dropout after each convolutional block.
        dense_dropout: dropout after the dense layer.
        pooled_size: side of the grid the last feature map is average-pooled to before flattening.

    Input ``(B, in_channels, H, W)``, H and W >= 2**len(filters) -> logits ``(B, num_classes)``. The bundle uses
    96x96: five poolings leave exactly a 3x3 map, so the adaptive pool is the identity there and the network is
    the plain "flatten -> dense 512" design.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        filters: Sequence[int] = (128, 64, 32, 64, 128),
        dense_units: int = 512,
        dropout: float = 0.25,
        dense_dropout: float = 0.5,
        pooled_size: int = 3,
    ) -> None:
        super().__init__()
        if not filters:
            raise ValueError("filters must name at least one block")
        self.in_channels = in_channels
        self.num_classes = num_classes
        blocks = []
        ch = in_channels
        for f in filters:
            blocks.append(_VBlock(ch, int(f), dropout))
            ch = int(f)
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(pooled_size)
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(ch * pooled_size * pooled_size, dense_units),
            nn.ReLU(inplace=True),
            nn.Dropout(dense_dropout),
            nn.Linear(dense_units, num_classes),
        )
        # Convolutions: He init for ReLU; dense layers keep PyTorch's default (fan-in uniform), which keeps the
        # initial logits small enough for RMSprop at lr 1e-3.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    #: Grad-CAM target: the last convolutional block.
    gradcam_layer = "features.4"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))
