"""COVID-19 detection member: a learned slice-mixing convolution in front of a 2D DenseNet-161.

After the CNR-IEMN COV19D detection approach: the lung slices of a scan are resampled to a 64-slice
stack, a 3x3 convolution maps the 64 slices to 3 channels, and a 2D CNN classifies the result.
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn

from .factory import register_network

__all__ = ["DetectionMember"]


@register_network("ct_detection_member")
class DetectionMember(nn.Module):
    """One member of the detection ensemble: ``Conv2d(in_slices -> 3, 3x3) -> timm backbone``.

    Args:
        in_slices: slices of the input stack (the paper's 64); they are the input channels.
        num_classes: output classes; 2 = (non-COVID, COVID), class 1 is COVID.
        backbone: timm model name (``"densenet161"`` in the paper), built with ``pretrained=False``.
        drop_rate: dropout before the classifier of the backbone.

    Input: ``(B, in_slices, H, W)``, depth as channels (``ctcovid.transforms.BuildDetectionInput``
    makes ``(64, 224, 224)``); any H, W >= 32 work.
    Output: ``(B, num_classes)`` logits.
    """

    def __init__(
        self, in_slices: int = 64, num_classes: int = 2, backbone: str = "densenet161", drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.in_slices = in_slices
        self.num_classes = num_classes
        self.input_block = nn.Conv2d(in_slices, 3, kernel_size=3, stride=1, padding=1)
        self.backbone = timm.create_model(
            backbone, pretrained=False, num_classes=num_classes, drop_rate=drop_rate
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_slices:
            raise ValueError(
                f"DetectionMember expects {self.in_slices} slices as channels, got shape {tuple(x.shape)}"
            )
        return self.backbone(self.input_block(x))
