"""Lung masks for regional learning, predicted by the X-ray lung segmenter (bundle ``cxr_lung_segmentation``).

Regional learning (``configs/train_regional.json`` of the cascade bundles) needs a lung mask for every
training image. Manual masks exist only for ieee8023 COVID-19 images, so the masks come from the segmenter:
:func:`predict_lung_masks` writes ``<mask_root>/<image's relative path>.png`` (0 / 255, the image's own size),
the layout ``load_datalist(..., lung_masks=True, mask_root=...)`` reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ctcovid.bundle.loading import load_stage
from ctcovid.io.errors import CTInputError

__all__ = ["LUNG_SEGMENTATION_BUNDLE", "lung_mask_cleanup", "predict_lung_masks", "mask_path"]

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

    The segmenter runs on its own preprocessing (``inference.json`` of its bundle, loader excluded); its
    class probabilities are resized back to the image size (bilinear) before the arg-max, which gets the
    bundle's clean-up (:func:`lung_mask_cleanup` with its ``keep_components`` and ``fill_holes``). Returns counts of
    ``written``, ``existing`` and ``failed`` images (unreadable ones are logged and skipped).

    Raises:
        ctcovid.bundle.loading.MissingWeightsError: the segmenter has no trained weights.
    """
    from monai.transforms import Compose

    from ctcovid.io import LoadXRayd, load_xray
    from ctcovid.visualize.gradcam import save_png_atomic

    dev = torch.device(device)
    stage = load_stage("lung segmentation", LUNG_SEGMENTATION_BUNDLE, bundle_dir, device=dev)
    pre = stage.config.get_parsed_content("preprocessing")
    transform = Compose([t for t in pre.transforms if not isinstance(t, LoadXRayd)])
    clean = lung_mask_cleanup(
        stage.config_value("keep_components", default=2), stage.config_value("fill_holes", default=True)
    )
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
        x = transform({"image": image})["image"]
        x = (x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x))[None].float().to(dev)
        with torch.no_grad():
            prob = torch.softmax(stage.network(x).float(), dim=1)
        prob = torch.nn.functional.interpolate(prob, size=tuple(image.shape[1:]), mode="bilinear", align_corners=False)
        mask = clean(prob.argmax(dim=1).cpu())[0].numpy().astype(np.uint8) * 255
        save_png_atomic(mask, out)
        counts["written"] += 1
    return counts
