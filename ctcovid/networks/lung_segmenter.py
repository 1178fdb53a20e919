"""2D lung segmenter: MONAI's Attention U-Net applied slice by slice."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import AttentionUnet

from .factory import register_network

__all__ = ["LungSegmenter"]


@register_network("lung_segmenter")
class LungSegmenter(AttentionUnet):
    """Per-slice lung segmentation with MONAI :class:`~monai.networks.nets.AttentionUnet` (2D).

    A subclass rather than a wrapper so the state-dict keys are exactly MONAI's.

    Args:
        in_channels: channels of one slice (1 for CT).
        out_channels: segmentation classes; 2 = (background, lung).
        channels: feature channels per level. The default (16, 32, 64, 128, 256) has about 2.0 M
            parameters (a ~8 MB float32 state dict).
        strides: down-sampling stride per level (``len(channels) - 1`` entries).
        dropout: dropout probability inside the convolution blocks.

    Input: ``(B, in_channels, H, W)`` with H and W divisible by ``prod(strides)`` (16 by default).
    Output: ``(B, out_channels, H, W)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 2),
        dropout: float = 0.0,
    ) -> None:
        if len(strides) != len(channels) - 1:
            raise ValueError(
                f"need len(strides) == len(channels) - 1, got {len(strides)} and {len(channels)}"
            )
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(channels),
            strides=tuple(strides),
            dropout=dropout,
        )
        self.size_divisor = math.prod(int(s) for s in strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # AttentionUnet fails deep inside on a skip-connection shape mismatch otherwise; say why up front.
        h, w = x.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(
                f"LungSegmenter input H, W = ({h}, {w}) must be divisible by {self.size_divisor} "
                "(pad or resize the slices first, e.g. with monai.transforms.DivisiblePad)"
            )
        return super().forward(x)
