"""ResNet-18 chest X-ray classifier (COVID-19 vs normal by default) and its CBAM variant.

Both are torchvision's ``resnet18(weights=None)`` (never downloaded) with the first convolution sized for
``in_channels`` and a ``num_classes`` head. The CBAM variant inserts a :class:`~ctcovid.networks.cbam.CBAM`
module after the stem convolution (conv1 + BN + ReLU, 64 channels at 1/2 resolution, before the max-pool)
and after the last residual stage (``layer4``, 512 channels at 1/32 resolution, before global pooling).

Initialisation is Kaiming (He) by default; ``pretrained_path`` initialises the ResNet weights from a LOCAL
checkpoint instead (a torchvision ``resnet18`` state dict or one saved from this class), see
:func:`load_resnet18_checkpoint`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.models import resnet18

from ctcovid.io.errors import CheckpointMismatchError, CorruptFileError

from .cbam import CBAM
from .factory import register_network

__all__ = ["ResNet18Classifier", "CBAMResNet18Classifier", "kaiming_init_", "load_resnet18_checkpoint"]


def kaiming_init_(module: nn.Module) -> nn.Module:
    """Kaiming (He) initialisation in place.

    ``Conv2d``: ``kaiming_normal_`` (fan-out, ReLU gain, as He et al. for ResNets); ``Linear``:
    ``kaiming_normal_`` with linear gain (logits of unit scale); biases 0; batch-norm weight 1, bias 0.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


@register_network("resnet18_classifier")
class ResNet18Classifier(nn.Module):
    """ResNet-18 classifier with optional CBAM attention.

    Args:
        in_channels: image channels (1 for a grey radiograph).
        num_classes: output logits (2 = normal, COVID-19 in the bundle; any number works).
        cbam: insert CBAM after the stem convolution and after ``layer4``.
        cbam_reduction: channel-attention MLP reduction ratio ``r``.
        cbam_spatial_kernel: spatial-attention convolution size (7).
        pretrained_path: LOCAL checkpoint to initialise from (never downloaded); ``None`` = Kaiming init.
            See :func:`load_resnet18_checkpoint` for what is accepted.

    Input ``(B, in_channels, H, W)`` (224x224 in the bundle; H, W >= 32) -> logits ``(B, num_classes)``.
    ``gradcam_layer`` names the last feature map before pooling (``cbam_out`` for the CBAM variant, so the
    Grad-CAM of both variants is taken at the same depth, after attention where there is attention).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        cbam: bool = False,
        cbam_reduction: int = 16,
        cbam_spatial_kernel: int = 7,
        pretrained_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.use_cbam = cbam
        backbone = resnet18(weights=None, num_classes=num_classes)
        if in_channels != 3:
            backbone.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.backbone = backbone
        self.cbam_stem: nn.Module = CBAM(64, cbam_reduction, cbam_spatial_kernel) if cbam else nn.Identity()
        self.cbam_out: nn.Module = CBAM(512, cbam_reduction, cbam_spatial_kernel) if cbam else nn.Identity()
        self.gradcam_layer = "cbam_out" if cbam else "backbone.layer4"
        kaiming_init_(self)
        if pretrained_path is not None:
            load_resnet18_checkpoint(self, pretrained_path)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> last feature map ``(B, 512, H/32, W/32)``."""
        b = self.backbone
        x = self.cbam_stem(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(x)))))
        return self.cbam_out(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.backbone.avgpool(self.features(x)), 1)
        return self.backbone.fc(x)


@register_network("cbam_resnet18_classifier")
def CBAMResNet18Classifier(**kwargs) -> ResNet18Classifier:  # noqa: N802 (constructor-like name)
    """:class:`ResNet18Classifier` with ``cbam=True`` (same arguments otherwise)."""
    kwargs.setdefault("cbam", True)
    return ResNet18Classifier(**kwargs)


_WRAPPER_KEYS = ("state_dict", "model", "network", "net", "model_state_dict")
_PREFIXES = ("module.", "model.", "net.", "network.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors: a truncated or non-checkpoint file
        raise CorruptFileError(path, f"cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    for key in _WRAPPER_KEYS:  # checkpoints saved with the optimiser etc. keep the weights under one key
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptFileError(path, "does not hold a state dict (name -> tensor)")
    out = {}
    for k, v in obj.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = v
    return out


def load_resnet18_checkpoint(model: ResNet18Classifier, path: str | os.PathLike) -> dict[str, list[str]]:
    """Initialise ``model`` from a local checkpoint, in place.

    Accepted: a torchvision ResNet-18 state dict (``conv1.weight``, ..., ``fc.bias``) or one of this class
    (``backbone.*``, ``cbam_*``), optionally wrapped under ``state_dict`` / ``model`` / ``network`` and with a
    ``module.`` prefix. Adaptations, each reported in the returned dict:

    - ``head_reset``: ``fc`` is skipped when its class count differs (e.g. a 1000-class ImageNet head); the
      head keeps its Kaiming initialisation and must be trained;
    - ``conv1_adapted``: a 3-channel ``conv1`` loaded into a 1-channel model is summed over its input
      channels (a grey image equals an RGB image with three equal channels);
    - ``attention_init``: CBAM parameters absent from a plain ResNet checkpoint keep their Kaiming init.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptFileError: the file is not a readable state dict.
        CheckpointMismatchError: any other missing or unexpected key, or a shape that cannot be adapted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained checkpoint not found (weights are never downloaded)")
    state = _read_state_dict(path)
    target = model.state_dict()
    if not any(k.startswith("backbone.") for k in state):
        state = {f"backbone.{k}": v for k, v in state.items()}
    report: dict[str, list[str]] = {"head_reset": [], "conv1_adapted": [], "attention_init": []}
    unexpected = sorted(k for k in state if k not in target)
    missing = []
    for k in target:
        if k in state:
            continue
        if k.startswith("cbam_"):
            report["attention_init"].append(k)
        else:
            missing.append(k)
    bad_shapes = []
    load = {}
    for k, v in state.items():
        if k not in target:
            continue
        want = target[k].shape
        if v.shape == want:
            load[k] = v
        elif k.startswith("backbone.fc."):
            report["head_reset"].append(k)
        elif k == "backbone.conv1.weight" and v.ndim == 4 and v.shape[1] == 3 and want[1] == 1 and v.shape[0] == want[0]:
            load[k] = v.sum(dim=1, keepdim=True)
            report["conv1_adapted"].append(k)
        else:
            bad_shapes.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(want)}")
    if missing or unexpected or bad_shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if bad_shapes:
            parts.append(f"shape mismatches {bad_shapes[:8]}")
        raise CheckpointMismatchError(path, "not a ResNet-18 checkpoint for this model: " + "; ".join(parts))
    model.load_state_dict(load, strict=False)
    return report
