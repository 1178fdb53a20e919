"""Domain-extension transfer learning (DETL, after Basu et al. 2020) networks for chest X-rays.

Stage A trains a plain CNN from scratch on a *source* task (normal vs disease). Stage B takes that network,
replaces its last fully connected layer by a new head for the *target* task (normal, other disease,
pneumonia, COVID-19), freezes everything up to the last convolutional block and fine-tunes the rest.

:class:`DETLNet` wraps torchvision's AlexNet, VGG-16 or ResNet-50 (``weights=None``: never downloaded) with
the first convolution sized for ``in_channels``. "Convolutional block" means a stage between two
spatial down-samplings: AlexNet's last block is conv3-conv5 (``features[6:]``), VGG-16's is conv5_1-conv5_3
(``features[24:]``), ResNet-50's is ``layer4``. The classifier layers after the last block stay trainable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.models import alexnet, resnet50, vgg16

from ctcovid.io.errors import CheckpointMismatchError, CorruptFileError

from .factory import register_network

__all__ = ["DETLNet", "DETL_ARCHS", "DETL_TARGET_CLASSES"]

DETL_ARCHS = ("alexnet", "vgg16", "resnet50")
#: Stage-B classes, in the bundle's label order.
DETL_TARGET_CLASSES = ("normal", "other disease", "pneumonia", "COVID-19")


@register_network("detl")
class DETLNet(nn.Module):
    """AlexNet-, VGG16- or ResNet50-style classifier with DETL head replacement and freezing.

    Args:
        arch: ``"alexnet"``, ``"vgg16"`` or ``"resnet50"`` (torchvision definitions, ``weights=None``).
        in_channels: image channels (1 for a grey radiograph).
        num_classes: output logits of this model (2 for stage A, 4 for stage B).
        source_checkpoint: a stage-A weights file (local). When given, the model is first built with
            ``source_num_classes`` outputs, loaded strictly from it, and then its head is replaced by a new
            ``num_classes`` head (stage B initialisation).
        source_num_classes: output count of the stage-A model in ``source_checkpoint``.
        freeze: freeze every parameter up to (not including) the last convolutional block; frozen
            batch-norm layers also keep their running statistics (they stay in eval mode).

    Input ``(B, in_channels, H, W)`` (224x224 by default; AlexNet needs H, W >= 63, VGG/ResNet >= 32)
    -> logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        arch: str = "alexnet",
        in_channels: int = 1,
        num_classes: int = 2,
        source_checkpoint: str | os.PathLike | None = None,
        source_num_classes: int = 2,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        if arch not in DETL_ARCHS:
            raise ValueError(f"arch must be one of {DETL_ARCHS}, got {arch!r}")
        self.arch = arch
        self.in_channels = in_channels
        self.frozen = False
        first = source_num_classes if source_checkpoint is not None else num_classes
        self.net = _build(arch, in_channels, first)
        self.num_classes = first
        if source_checkpoint is not None:
            self.load_source(source_checkpoint)
            self.replace_head(num_classes)
        if freeze:
            self.freeze_until_last_block()

    # --- structure ---------------------------------------------------------------------------------
    @property
    def head(self) -> nn.Linear:
        """The last fully connected layer (replaced by :meth:`replace_head`)."""
        return self.net.fc if self.arch == "resnet50" else self.net.classifier[-1]

    @property
    def gradcam_layer(self) -> str:
        """Name of the last convolutional feature map (a Grad-CAM target)."""
        return "net.layer4" if self.arch == "resnet50" else "net.features"

    def last_block(self) -> nn.Module:
        """The last convolutional block (trainable in stage B)."""
        if self.arch == "resnet50":
            return self.net.layer4
        return self.net.features[6:] if self.arch == "alexnet" else self.net.features[24:]

    def frozen_modules(self) -> list[nn.Module]:
        """Modules up to the last convolutional block (frozen in stage B)."""
        if self.arch == "resnet50":
            n = self.net
            return [n.conv1, n.bn1, n.layer1, n.layer2, n.layer3]
        cut = 6 if self.arch == "alexnet" else 24
        return [self.net.features[:cut]]

    def replace_head(self, num_classes: int) -> None:
        """Replace the last fully connected layer by a freshly initialised ``num_classes`` layer."""
        old = self.head
        new = nn.Linear(old.in_features, num_classes)
        if self.arch == "resnet50":
            self.net.fc = new
        else:
            self.net.classifier[-1] = new
        self.num_classes = num_classes

    def freeze_until_last_block(self) -> None:
        """Stop gradients for every parameter before the last convolutional block."""
        for m in self.frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)
        self.frozen = True
        self.train(self.training)  # re-apply eval mode to frozen batch norms

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters an optimiser should update (all of them unless frozen)."""
        return (p for p in self.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> DETLNet:
        super().train(mode)
        if self.frozen:
            for m in self.frozen_modules():
                for bn in m.modules():
                    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                        bn.eval()
        return self

    # --- weights ------------------------------------------------------------------------------------
    def load_source(self, path: str | os.PathLike) -> None:
        """Load stage-A weights strictly (raises a clear error for a wrong file or architecture)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: stage-A checkpoint not found (train stage A first)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CorruptFileError(path, f"cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
        for key in ("model", "network", "state_dict"):  # checkpoints saved with a wrapping dict
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
        if not isinstance(state, dict):
            raise CorruptFileError(path, "does not hold a state dict")
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointMismatchError(
                path, f"not a stage-A checkpoint of {self.arch} with {self.num_classes} classes: {e}"
            ) from e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _build(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    if arch == "alexnet":
        net = alexnet(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.features[0] = nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)
    elif arch == "vgg16":
        net = vgg16(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    else:
        net = resnet50(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    # torchvision initialises its own first conv; ours replaced it, so give it the same (Kaiming) init.
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == in_channels and in_channels != 3:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net
