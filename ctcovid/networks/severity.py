"""COVID-19 severity member: two lung volumes of different depth fused into one 2D Inception network.

After the CNR-IEMN COV19D severity approach: the lung-masked lung slices are resampled to a 32-slice and
a 16-slice stack (299x299); each goes through its own 3x3 convolution to 3 channels, a third 3x3
convolution fuses the 6 channels to 3, and an Inception network grades mild / moderate / severe / critical.
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn

from .factory import register_network

__all__ = ["SeverityMember", "SEVERITY_CLASSES"]

SEVERITY_CLASSES = ("mild", "moderate", "severe", "critical")


@register_network("ct_severity_member")
class SeverityMember(nn.Module):
    """One member of the severity ensemble (dual-volume input).

    Args:
        slices_a: slices of the first (deeper) stack, 32 in the paper.
        slices_b: slices of the second stack, 16 in the paper.
        num_classes: 4 = :data:`SEVERITY_CLASSES` (mild, moderate, severe, critical).
        backbone: timm model name, one of the paper's ``"inception_v3"``, ``"inception_v4"``,
            ``"inception_resnet_v2"`` (any timm classifier taking 3 channels works); ``pretrained=False``.
        drop_rate: dropout before the classifier of the backbone.

    Input: either one tensor ``(B, slices_a + slices_b, H, W)`` -- the two stacks concatenated on the
    channel axis, as ``ctcovid.transforms.BuildSeverityInput`` makes them (``(48, 299, 299)``), split
    here -- or two tensors ``forward(x_a, x_b)`` of shapes ``(B, slices_a, H, W)`` and ``(B, slices_b, H, W)``.
    The Inception backbones need H, W >= 75.
    Output: ``(B, num_classes)`` logits (one tensor in training and in evaluation: no auxiliary logits).
    """

    def __init__(
        self,
        slices_a: int = 32,
        slices_b: int = 16,
        num_classes: int = 4,
        backbone: str = "inception_v3",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.slices_a = slices_a
        self.slices_b = slices_b
        self.num_classes = num_classes
        self.conv_a = nn.Conv2d(slices_a, 3, kernel_size=3, padding=1)
        self.conv_b = nn.Conv2d(slices_b, 3, kernel_size=3, padding=1)
        self.fuse = nn.Conv2d(6, 3, kernel_size=3, padding=1)
        kwargs = {"aux_logits": False} if backbone == "inception_v3" else {}  # forward must return one tensor
        self.backbone = timm.create_model(
            backbone, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **kwargs
        )

    def forward(self, x: torch.Tensor, x_b: torch.Tensor | None = None) -> torch.Tensor:
        if x_b is None:
            if x.shape[1] != self.slices_a + self.slices_b:
                raise ValueError(
                    f"SeverityMember expects {self.slices_a} + {self.slices_b} concatenated slices as channels, "
                    f"got shape {tuple(x.shape)}"
                )
            x_a, x_b = torch.split(x, [self.slices_a, self.slices_b], dim=1)
        else:
            x_a = x
        if x_a.shape[1] != self.slices_a or x_b.shape[1] != self.slices_b:
            raise ValueError(
                f"SeverityMember expects ({self.slices_a}, {self.slices_b}) slices, got "
                f"{tuple(x_a.shape)} and {tuple(x_b.shape)}"
            )
        fused = self.fuse(torch.cat([self.conv_a(x_a), self.conv_b(x_b)], dim=1))
        out = self.backbone(fused)
        if isinstance(out, (tuple, list)):  # a backbone with auxiliary logits: keep the main head
            out = out[0]
        return out
