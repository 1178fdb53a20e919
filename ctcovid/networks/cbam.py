"""Convolutional Block Attention Module (CBAM, Woo et al., ECCV 2018) for 2D feature maps.

CBAM refines a feature map ``F`` in two sequential steps:

- channel attention ``M_c = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))``, shape ``(B, C, 1, 1)``, with one
  MLP (``C -> C/r -> C``, ReLU in between) shared by both pooled descriptors; ``F' = M_c * F``;
- spatial attention ``M_s = sigmoid(conv7x7([mean_c(F'); max_c(F')]))``, shape ``(B, 1, H, W)``, from the
  channel-wise mean and max of ``F'``; ``F'' = M_s * F'``.

Neither MONAI nor timm's ResNet-18 exposes CBAM as a block that can be placed at arbitrary points of a
torchvision network, so it is written here (MONAI has only squeeze-excitation, which is the average-pool half
of the channel attention).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ChannelAttention", "SpatialAttention", "CBAM"]


class ChannelAttention(nn.Module):
    """Channel attention of CBAM.

    Args:
        channels: channels ``C`` of the input feature map.
        reduction: reduction ratio ``r`` of the shared MLP's hidden layer (``max(1, C // r)`` units).

    Input ``(B, C, H, W)`` -> output ``(B, C, H, W)``, the input rescaled channel by channel.
    :meth:`attention` returns the weights ``(B, C, 1, 1)`` in ``(0, 1)``.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels} and {reduction}")
        hidden = max(1, channels // reduction)
        # 1x1 convolutions act as the shared fully connected MLP on (B, C, 1, 1) descriptors.
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=True),
        )

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Channel weights ``(B, C, 1, 1)`` of a ``(B, C, H, W)`` feature map."""
        avg = torch.mean(x, dim=(2, 3), keepdim=True)
        mx = torch.amax(x, dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class SpatialAttention(nn.Module):
    """Spatial attention of CBAM.

    Args:
        kernel_size: odd size of the convolution over the 2-channel (mean, max) map; the paper's is 7.

    Input ``(B, C, H, W)`` -> output ``(B, C, H, W)``, every channel rescaled by the same spatial map.
    :meth:`attention` returns the map ``(B, 1, H, W)`` in ``(0, 1)``.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial map ``(B, 1, H, W)`` of a ``(B, C, H, W)`` feature map."""
        pooled = torch.cat([torch.mean(x, dim=1, keepdim=True), torch.amax(x, dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CBAM(nn.Module):
    """Channel attention followed by spatial attention (the paper's sequential order).

    Args:
        channels: channels ``C`` of the feature map.
        reduction: channel-attention MLP reduction ratio ``r``.
        spatial_kernel_size: spatial-attention convolution size (7 in the paper).

    Input ``(B, C, H, W)`` -> refined feature map ``(B, C, H, W)``.
    """

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(spatial_kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))
