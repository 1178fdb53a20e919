"""Lung masks for regional learning, predicted by the X-ray lung segmenter (bundle ``cxr_lung_segmentation``).

Regional learning (``configs/train_regional.json`` of the cascade bundles) and stage 1's lung-box crops
(``configs/train_lungbox.json``) need a lung mask for every training image. Manual masks exist only for
ieee8023 COVID-19 images, so the masks come from the segmenter:
:func:`predict_lung_masks` writes ``<mask_root>/<image's relative path>.png`` (0 / 255, the image's own size),
the layout ``load_datalist(..., lung_masks=True, mask_root=...)`` reads. :class:`CXRLungSegmenter` is the same
segmenter in memory, one image at a time, and :class:`SegmentLungsd` its dictionary transform (lung-box crops
at validation and inference).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor

from ctcovid.bundle.loading import load_stage
from ctcovid.cxr.stage import bundle_preprocessing, network_batch
from ctcovid.io.errors import CTInputError

__all__ = [
    "LUNG_SEGMENTATION_BUNDLE",
    "CXRLungSegmenter",
    "SegmentLungsd",
    "lung_mask_cleanup",
    "mask_path",
    "predict_lung_masks",
]

logger = logging.getLogger(__name__)

LUNG_SEGMENTATION_BUNDLE = "cxr_lung_segmentation"


def mask_path(mask_root: str | os.PathLike, name: str) -> Path:
    """Where the mask of the image with relative path ``name`` goes (same rule as ``load_datalist``)."""
    return Path(mask_root, name).with_suffix(".png")


def lung_mask_cleanup(keep_components: int = 2, fill_holes: bool = True):
    """The bundle's mask clean-up as one callable on a ``(1, H, W)`` 0/1 label: keep the ``keep_components``
    largest lung components (0: all), then fill holes. Same MONAI transforms as ``inference.json``."""
    from monai.transforms import Compose, FillHoles, KeepLargestConnectedComponent

    steps = []
    if keep_components > 0:
        steps.append(KeepLargestConnectedComponent(applied_labels=[1], num_components=keep_components))
    if fill_holes:
        steps.append(FillHoles(applied_labels=[1]))
    return Compose(steps)


class CXRLungSegmenter:
    """The X-ray lung segmenter (bundle ``cxr_lung_segmentation``) as a callable: ``(1, H, W)`` grey image in
    [0, 1] -> ``(1, H, W)`` uint8 lung mask (0 / 1) at the image's size.

    The segmenter runs on its own preprocessing (``inference.json`` of its bundle, loader excluded); its class
    probabilities are resized back to the image size (bilinear) before the arg-max, which gets the bundle's
    clean-up (:func:`lung_mask_cleanup` with its ``keep_components`` and ``fill_holes``).

    Raises ``ctcovid.bundle.loading.MissingWeightsError`` (on construction) when the bundle has no weights.
    """

    def __init__(self, bundle_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.stage = load_stage("lung segmentation", LUNG_SEGMENTATION_BUNDLE, bundle_dir, device=self.device)
        self.transform = bundle_preprocessing(self.stage.config)
        self.clean = lung_mask_cleanup(
            self.stage.config_value("keep_components", default=2), self.stage.config_value("fill_holes", default=True)
        )

    @property
    def provenance(self) -> dict:
        return self.stage.provenance()

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = network_batch(self.transform({"image": image})["image"], self.device)
        prob = torch.softmax(self.stage.network(x).float(), dim=1)
        prob = torch.nn.functional.interpolate(prob, size=tuple(image.shape[1:]), mode="bilinear", align_corners=False)
        mask = self.clean(prob.argmax(dim=1).cpu())
        return convert_to_tensor(mask, track_meta=False).to(torch.uint8)


class SegmentLungsd(MapTransform):
    """Dictionary transform: the lung mask of ``keys`` (``(1, H, W)`` radiograph) from the X-ray lung segmenter,
    written to ``output_key``; a bundle's preprocessing uses it where its network expects lung-box crops and
    no mask comes with the image (inference).

    Args:
        keys: the radiograph key.
        output_key: where the ``(1, H, W)`` uint8 mask goes.
        bundle_dir: folder holding ``cxr_lung_segmentation`` (default: the package's bundles).
        device: where the segmenter runs.
        segmenter: a ready segmenter (any ``image -> mask`` callable); default: :class:`CXRLungSegmenter`,
            loaded on first use so that parsing a config costs nothing.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        output_key: str = "lung_mask",
        bundle_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        segmenter: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"SegmentLungsd segments one image key, got {self.keys}")
        self.output_key = output_key
        self.bundle_dir, self.device = bundle_dir, device
        self.segmenter = segmenter

    def load(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The segmenter, loaded now if not yet (a caller that wants missing weights reported up front)."""
        if self.segmenter is None:
            self.segmenter = CXRLungSegmenter(self.bundle_dir, self.device)
        return self.segmenter

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.load()
        d = dict(data)
        d[self.output_key] = self.segmenter(d[self.keys[0]])
        return d


def predict_lung_masks(
    items: Sequence[dict],
    mask_root: str | os.PathLike,
    bundle_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> dict[str, int]:
    """Segment the lungs of every item's image and write the masks under ``mask_root``.

    Args:
        items: dicts with ``image`` (absolute path) and ``name`` (relative path, e.g. from
            :func:`ctcovid.cxr.datalists.load_datalist`).
        mask_root: output folder.
        bundle_dir: folder holding ``cxr_lung_segmentation`` (default: the package's bundles).
        device: where the segmenter runs.
        overwrite: recompute masks that already exist.

    Masks are :class:`CXRLungSegmenter`'s. Returns counts of ``written``, ``existing`` and ``failed`` images
    (unreadable ones are logged and skipped).

    Raises:
        ctcovid.bundle.loading.MissingWeightsError: the segmenter has no trained weights.
    """
    from ctcovid.io import load_xray
    from ctcovid.visualize.gradcam import save_png_atomic

    segment = CXRLungSegmenter(bundle_dir, device)
    counts = {"written": 0, "existing": 0, "failed": 0}
    for it in items:
        out = mask_path(mask_root, it["name"])
        if out.is_file() and not overwrite:
            counts["existing"] += 1
            continue
        try:
            image = load_xray(it["image"])
        except CTInputError as e:
            logger.warning("no lung mask for %s: %s", it["image"], e)
            counts["failed"] += 1
            continue
        save_png_atomic(segment(image)[0].numpy() * 255, out)
        counts["written"] += 1
    return counts
