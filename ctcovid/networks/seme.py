"""SEME networks of Cascade-SEME: squeeze-excitation (SE) CNNs with a Moment Exchange (MoEx) layer.

- :class:`SEResNet50` (``"seme_resnet50"``, stage 1 of the X-ray cascade: normal / bacterial / viral): timm's
  ``seresnet50`` (``pretrained=False``), whose bottlenecks apply SE to the residual branch before the addition.
- :class:`SEDenseNet169` (``"seme_densenet169"``, stage 2: COVID-19 / other viral): timm's ``densenet169``
  features with a MONAI :class:`~monai.networks.blocks.ChannelSELayer` after every dense block, i.e. on the
  concatenation (fusion) of the block's features, before the transition. Neither MONAI nor timm has an
  SE-DenseNet, so the SE layers are inserted here.

Both end in global average pooling, so any input size works (224, 512, ...), are initialised He-uniform
(``kaiming_uniform_`` of every convolution and linear weight) and carry a :class:`MomentExchange` layer after an
early block (attribute ``.moex``; ``None`` when ``moex=False``). ``gradcam_layer`` names a sensible Grad-CAM
target layer (the last feature map before pooling).
"""

from __future__ import annotations

from collections import OrderedDict

import timm
import torch
import torch.nn as nn
from monai.networks.blocks import ChannelSELayer

from .factory import register_network
from .moex import MomentExchange

__all__ = ["SEResNet50", "SEDenseNet169", "he_uniform_init_"]


def he_uniform_init_(module: nn.Module) -> nn.Module:
    """He-uniform initialisation, in place: ``kaiming_uniform_`` (fan-in, ReLU gain) for every ``Conv*d`` and
    ``Linear`` weight, zero biases. Normalisation layers keep their constructor initialisation."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


@register_network("seme_resnet50")
class SEResNet50(nn.Module):
    """SE-ResNet-50 with an optional Moment Exchange layer (SEME-ResNet50).

    Args:
        in_channels: image channels (3 for the paper's replicated grey radiographs, 1 for grey input).
        num_classes: output logits (stage 1: normal, bacterial, viral).
        moex: insert a :class:`MomentExchange` layer after ``moex_layer``.
        moex_layer: block after which MoEx acts: ``"stem"``, ``"layer1"`` (default), ``"layer2"``,
            ``"layer3"`` or ``"layer4"``.
        moex_p: probability that MoEx is applied to a training batch.
        moex_lam: MoEx loss weight of the original label (read by the MoEx loss).

    SE reduction ratio: timm's seresnet50 default (16).

    Input ``(B, in_channels, H, W)`` with H, W >= 32 -> logits ``(B, num_classes)``.
    """

    moex_layers = ("stem", "layer1", "layer2", "layer3", "layer4")
    #: Grad-CAM target: the last residual stage (2048 channels at 1/32 of the input size).
    gradcam_layer = "backbone.layer4"

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 3,
        moex: bool = True,
        moex_layer: str = "layer1",
        moex_p: float = 1.0,
        moex_lam: float = 0.9,
    ) -> None:
        super().__init__()
        if moex_layer not in self.moex_layers:
            raise ValueError(f"moex_layer must be one of {self.moex_layers}, got {moex_layer!r}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.moex_layer = moex_layer
        # global_pool="avg": adaptive average pooling, so 224 and 512 inputs both work.
        self.backbone = timm.create_model(
            "seresnet50", pretrained=False, in_chans=in_channels, num_classes=num_classes, global_pool="avg"
        )
        self.moex = MomentExchange(p=moex_p, lam=moex_lam) if moex else None
        he_uniform_init_(self.backbone)

    def _maybe_moex(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.moex is not None and name == self.moex_layer:
            return self.moex(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.act1(b.bn1(b.conv1(x))))
        x = self._maybe_moex("stem", x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(b, name)(x)
            x = self._maybe_moex(name, x)
        return b.forward_head(x)


@register_network("seme_densenet169")
class SEDenseNet169(nn.Module):
    """SE-DenseNet-169 with an optional Moment Exchange layer (SEME-DenseNet169).

    ``features`` is timm's DenseNet-169 feature stack with a channel SE layer (MONAI ``ChannelSELayer``)
    inserted after each dense block (``se1`` .. ``se4``), then global average pooling and a linear classifier.

    Args:
        in_channels: image channels.
        num_classes: output logits (stage 2: COVID-19, other viral).
        moex: insert a :class:`MomentExchange` layer after ``moex_layer``.
        moex_layer: module of ``features`` after which MoEx acts, e.g. ``"pool0"``, ``"se1"`` (default: after
            the first dense block and its SE), ``"transition1"``, ``"se2"``, ...
        moex_p: probability that MoEx is applied to a training batch.
        moex_lam: MoEx loss weight of the original label.
        r: SE reduction ratio.
        drop_rate: dropout before the classifier.

    Input ``(B, in_channels, H, W)`` with H, W >= 32 -> logits ``(B, num_classes)``.
    """

    #: Grad-CAM target: the final normalised feature map (1664 channels at 1/32 of the input size).
    gradcam_layer = "features.norm5"

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        moex: bool = True,
        moex_layer: str = "se1",
        moex_p: float = 1.0,
        moex_lam: float = 0.9,
        r: int = 16,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        base = timm.create_model("densenet169", pretrained=False, in_chans=in_channels, num_classes=0)
        f = base.features
        layers: list[tuple[str, nn.Module]] = [("conv0", f.conv0), ("norm0", f.norm0), ("pool0", f.pool0)]
        for i in range(1, 5):
            block = getattr(f, f"denseblock{i}")
            # Channels of the concatenated block output = input channels of what follows it.
            ch = getattr(f, f"transition{i}").norm.num_features if i < 4 else f.norm5.num_features
            layers += [(f"denseblock{i}", block), (f"se{i}", ChannelSELayer(spatial_dims=2, in_channels=ch, r=r))]
            if i < 4:
                layers.append((f"transition{i}", getattr(f, f"transition{i}")))
        layers.append(("norm5", f.norm5))
        self.features = nn.Sequential(OrderedDict(layers))
        if moex_layer not in self.features._modules:
            raise ValueError(f"moex_layer must name a module of features {list(self.features._modules)}")
        self.moex_layer = moex_layer
        self.moex = MomentExchange(p=moex_p, lam=moex_lam) if moex else None
        self.num_features = f.norm5.num_features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(self.num_features, num_classes)
        he_uniform_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, module in self.features.named_children():
            x = module(x)
            if self.moex is not None and name == self.moex_layer:
                x = self.moex(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(self.drop(x))
