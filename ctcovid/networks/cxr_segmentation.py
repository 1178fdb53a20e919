"""Chest X-ray lung segmentation networks.

The ``cxr_lung_segmentation`` bundle uses MONAI's 2D :class:`~monai.networks.nets.UNet` by default (configured
in the bundle); :class:`DeepLabV3LungSegmenter` is the alternative selected by the bundle's
``"network_name": "deeplabv3"`` switch. It wraps torchvision's DeepLabV3 (never pretrained) so that it takes
any number of input channels and returns a tensor (torchvision returns a dict), as MONAI inferers expect.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import segmentation as tv_seg

from .factory import register_network

__all__ = ["DeepLabV3LungSegmenter"]

_BUILDERS = {
    "resnet50": tv_seg.deeplabv3_resnet50,
    "resnet101": tv_seg.deeplabv3_resnet101,
    "mobilenet_v3_large": tv_seg.deeplabv3_mobilenet_v3_large,
}


@register_network("cxr_deeplabv3")
class DeepLabV3LungSegmenter(nn.Module):
    """DeepLabV3 (torchvision, ``weights=None, weights_backbone=None``) for 2D lung segmentation.

    Args:
        in_channels: image channels (1 for grey radiographs); the backbone's first convolution is replaced
            when it differs from 3.
        out_channels: output classes (2: background, lung).
        backbone: ``"resnet50"`` (default), ``"resnet101"`` or ``"mobilenet_v3_large"``.

    Input ``(B, in_channels, H, W)`` -> logits ``(B, out_channels, H, W)`` (upsampled to the input size).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, backbone: str = "resnet50") -> None:
        super().__init__()
        if backbone not in _BUILDERS:
            raise ValueError(f"backbone must be one of {sorted(_BUILDERS)}, got {backbone!r}")
        self.model = _BUILDERS[backbone](
            weights=None, weights_backbone=None, num_classes=out_channels, aux_loss=False
        )
        if in_channels != 3:
            body = self.model.backbone
            if backbone.startswith("resnet"):
                old = body.conv1
                body.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                       bias=False)
            else:  # mobilenet: first ConvBNActivation of the feature extractor
                old = body["0"][0]
                body["0"][0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                         bias=False)
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)["out"]
        if out.shape[-2:] != x.shape[-2:]:  # torchvision already upsamples; keep the contract explicit
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out
