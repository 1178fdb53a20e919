"""One classifier of the X-ray cascade loaded from its bundle (:class:`CXRStage`), and the refusal when the
cascade's bundles have no weights (:class:`CascadeWeightsError`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ctcovid.bundle.errors import MissingWeightsError
from ctcovid.bundle.loading import load_stage
from ctcovid.running.device import resolve_device

__all__ = ["CXRStage", "CascadeWeightsError", "bundle_preprocessing", "network_batch", "trained_lung_box_margin"]


class CascadeWeightsError(MissingWeightsError):
    """One or both cascade bundles have no trained weights (this project ships none for them)."""

    def __init__(self, missing: Sequence[tuple[str, str, Path]]):
        self.missing = list(missing)
        stage, bundle, bdir = self.missing[0]
        super().__init__(self._message(), bundle=bundle, stage=stage, bundle_dir=bdir)

    def _message(self) -> str:
        lines = ["the X-ray cascade cannot run: no trained weights for"]
        for stage, bundle, bdir in self.missing:
            lines.append(f"  - {stage} ({bundle}): {Path(bdir) / 'models' / 'model.pt'} is missing")
        lines.append(
            "ctcovid's own bundles ship these weights; a bundle folder without them (--bundle-dir, a copy of the "
            "configs only) must be trained: `python -m monai.bundle run --config_file <bundle>/configs/train.json`, "
            "then calibrate the viral threshold with `ctcovid cxr calibrate` (see the bundles' docs/README.md)."
        )
        return "\n".join(lines)


def _train_info(bundle_dir: Path) -> dict:
    """``models/train_info.json``, written by the bundle's training (``{}`` if absent or unreadable)."""
    try:
        info = json.loads((Path(bundle_dir) / "models" / "train_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _trained_size(info: dict) -> list[int] | None:
    """``spatial_size`` recorded in ``models/train_info.json`` (``info``) by the bundle's training, if any."""
    size = info.get("spatial_size")
    return [int(v) for v in size] if isinstance(size, list) and len(size) == 2 else None


def _lung_box_margin(info: dict) -> float | None:
    margin = info.get("lung_box_margin")
    return None if margin is None else float(margin)


def trained_lung_box_margin(bundle_dir: str | os.PathLike) -> float | None:
    """The margin of the lung-box crops the bundle's weights were trained on (``configs/train_lungbox.json``
    records it in ``models/train_info.json``); ``None``: trained on whole films."""
    return _lung_box_margin(_train_info(Path(bundle_dir)))


def bundle_preprocessing(config) -> Callable[[dict], dict]:
    """A bundle's parsed ``preprocessing`` without its file loader (``LoadXRayd``): for images already read."""
    from monai.transforms import Compose

    from ctcovid.io import LoadXRayd

    pre = config.get_parsed_content("preprocessing")
    return Compose([t for t in pre.transforms if not isinstance(t, LoadXRayd)])


def network_batch(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One preprocessed ``(C, h, w)`` image (MetaTensor or tensor) -> a ``(1, C, h, w)`` float32 batch on ``device``."""
    x = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    return x[None].float().to(device)


def _use_lung_box(cfg, bundle_dir: Path, margin: float | None) -> float | None:
    """Weights trained on lung-box crops (``margin``: ``lung_box_margin`` of ``models/train_info.json``, written by
    ``configs/train_lungbox.json``) get the bundle's ``configs/inference_lungbox.json`` on top of ``cfg`` (lung
    segmenter, then the box crop, in the preprocessing) with the trained margin. Returns the margin or ``None``."""
    from monai.bundle import ConfigParser

    if margin is None:
        return None
    overlay = Path(bundle_dir) / "configs" / "inference_lungbox.json"
    if not overlay.is_file():
        raise FileNotFoundError(f"{bundle_dir}: weights trained on lung-box crops (models/train_info.json) but no "
                                f"{overlay.name} in configs/ to crop the same way at inference")
    cfg.update(ConfigParser.load_config_files(str(overlay)))
    cfg["lung_box_margin"] = float(margin)
    return float(margin)


class CXRStage:
    """One classifier of the cascade: network, preprocessing and class names.

    Args:
        network: ``(1, C, H, W)`` -> logits ``(1, K)``; put in eval mode.
        class_names: the ``K`` class names.
        transform: maps ``{"image": (1, H, W) MetaTensor in [0, 1]}`` to ``{"image": (C, h, w)}`` (a bundle's
            preprocessing without its loader). Default: resize to ``spatial_size`` (bilinear, anti-aliased) and
            repeat the grey channel to the network's ``in_channels`` -- the bundles' own preprocessing. A
            transform that crops the film (a stage trained on lung-box crops, ``configs/train_lungbox.json``) also
            returns ``{"lung_box": {"box": [r0, r1, c0, c1], ...}}``.
        spatial_size: network input size for the default transform.
        device: where the network runs.
        gradcam_layer: module name for Grad-CAM (default: ``network.gradcam_layer``).
        name: stage name for messages; ``provenance``: JSON facts stored with results (bundle, weights hash).
    """

    def __init__(
        self,
        network: nn.Module,
        class_names: Sequence[str],
        transform: Callable[[dict], dict] | None = None,
        spatial_size: Sequence[int] = (512, 512),
        device: str | torch.device = "cpu",
        gradcam_layer: str | None = None,
        name: str = "",
        provenance: dict | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.network = network.to(self.device).eval()
        self.class_names = [str(c) for c in class_names]
        self.spatial_size = [int(s) for s in spatial_size]
        self.transform = transform if transform is not None else self._default_transform()
        self.gradcam_layer = gradcam_layer or getattr(network, "gradcam_layer", None)
        self.name = name
        self.provenance = dict(provenance or {})

    def _default_transform(self) -> Callable[[dict], dict]:
        from monai.transforms import Compose, EnsureTyped, RepeatChanneld, Resized

        repeats = int(getattr(self.network, "in_channels", 3))
        steps = [Resized("image", self.spatial_size, mode="bilinear", anti_aliasing=True)]
        if repeats > 1:
            steps.append(RepeatChanneld("image", repeats=repeats))
        steps.append(EnsureTyped("image", dtype=torch.float32))
        return Compose(steps)

    @classmethod
    def from_bundle(
        cls,
        stage: str,
        bundle: str,
        bundle_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        spatial_size: Sequence[int] | None = None,
    ) -> CXRStage:
        """Build from a bundle's ``inference.json`` (network, preprocessing minus the loader, class names)
        and ``models/model.pt``. Input size: ``spatial_size`` if given, else the size the weights were trained
        at (``models/train_info.json``, written by ``train.json``), else the config's ``spatial_size``.
        Weights trained on lung-box crops (``lung_box_margin`` in the same file) get ``inference_lungbox.json``'s
        preprocessing (the X-ray lung segmenter, then the crop) on top of ``inference.json``; the segmenter is
        loaded here, on ``device``, so missing segmenter weights are reported before any image is read.

        Raises ``ctcovid.bundle.loading.MissingWeightsError`` when the weights are absent.
        """
        from ctcovid.cxr.masks import SegmentLungsd

        dev = resolve_device(device)
        sm = load_stage(stage, bundle, bundle_dir, device=dev)
        cfg = sm.config
        info = _train_info(sm.bundle_dir)
        margin = _use_lung_box(cfg, sm.bundle_dir, _lung_box_margin(info))
        cfg["device"] = str(dev)  # where a segmenter in the preprocessing runs
        size = spatial_size or _trained_size(info)
        if size is not None:
            cfg["spatial_size"] = [int(s) for s in size]
        else:
            size = cfg.get_parsed_content("spatial_size") if "spatial_size" in cfg else (sm.input_shape() or [512, 512])
        transform = bundle_preprocessing(cfg)
        segmenters = [t.load() for t in transform.transforms if isinstance(t, SegmentLungsd)]
        return cls(
            sm.network,
            sm.channel_names(),
            transform=transform,
            spatial_size=size,
            device=dev,
            name=stage,
            # intended_use travels with every result: the bundle says where its answers mean nothing
            provenance={**sm.provenance(), "spatial_size": [int(s) for s in size],
                        "intended_use": (sm.metadata or {}).get("intended_use"),
                        **({"lung_box_margin": margin} if margin is not None else {}),
                        **({"lung_segmentation": segmenters[0].provenance} if segmenters else {})},
        )

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """``(1, H, W)`` grey image in [0, 1] -> ``(1, C, h, w)`` float32 network input on the device."""
        return self.prepare(image)[0]

    def prepare(self, image: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
        """As :meth:`preprocess`, with the crop ``[r0, r1, c0, c1]`` of ``image`` the input shows (``None``: the
        whole image)."""
        d = self.transform({"image": image})
        box = d.get("lung_box")
        return network_batch(d["image"], self.device), (list(box["box"]) if box else None)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        """Softmax probabilities ``(K,)`` for a ``(1, C, h, w)`` input."""
        return self.softmax(self.network(x))

    def softmax(self, logits: torch.Tensor) -> np.ndarray:
        """``(1, K)`` logits of this stage's network -> probabilities ``(K,)``; checks the shape."""
        if logits.ndim != 2 or logits.shape != (1, len(self.class_names)):
            raise RuntimeError(f"{self.name}: network output {tuple(logits.shape)}, expected (1, {len(self.class_names)})")
        return torch.softmax(logits.float(), dim=1)[0].cpu().numpy().astype(np.float64)
