"""Pieces of the lung-segmentation evaluation that MONAI lacks.

- :class:`LungLabeld`: turns whatever lung reference an item has (0/1 mask, 0/255 PNG, TotalSegmentator
  label map with ``label_values``) into a 0/1 channel-first mask; MONAI's label transforms cannot read
  the per-item label list.
- :class:`SpacedHausdorffDistance`: MONAI's ``HausdorffDistance`` handler computes in voxels; the metric
  itself accepts ``spacing`` but the handler never passes it. This one passes the voxel size of each
  prediction (from its affine), so HD95 comes out in millimetres on anisotropic CT (0.68 x 0.68 x 6 mm).
- :func:`threshold_lung_mask`: conventional HU threshold + connected components lung mask (scikit-image),
  the sanity reference on HU scans that have no manual mask. Never used as a training label.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.handlers.ignite_metric import IgniteMetricHandler
from monai.metrics import HausdorffDistanceMetric
from monai.transforms import MapTransform

from ctcovid.training.slices import binarize_label

__all__ = ["LungLabeld", "SpacedHausdorffDistance", "dice", "threshold_lung_mask", "voxel_spacing"]


class LungLabeld(MapTransform):
    """0/1 lung mask ``(1, X, Y, Z)`` from a loaded reference, using the item's ``label_values`` if any.

    Args:
        keys: the label key(s).
        label_values_key: item key listing the label-map values that are lung (e.g. TotalSegmentator
            lobes 10-14); removed from the item afterwards so batches collate, as is ``label_threshold``
            (foreground above it: MedSeg infection masks).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self, keys: KeysCollection, label_values_key: str = "label_values", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_values_key = label_values_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        values = d.pop(self.label_values_key, None)
        threshold = d.pop("label_threshold", None)
        for key in self.key_iterator(d):
            lab = d[key]
            out = binarize_label(torch.as_tensor(lab), values, threshold)
            d[key] = MetaTensor(out, meta=dict(lab.meta)) if isinstance(lab, MetaTensor) else out
        return d


def voxel_spacing(img: torch.Tensor) -> tuple[float, ...]:
    """Voxel size (mm per spatial axis) from a MetaTensor's affine; 1.0 per axis without one."""
    nd = img.ndim - 1  # channel first
    if isinstance(img, MetaTensor) and img.affine is not None:
        aff = torch.as_tensor(img.affine, dtype=torch.float64)
        return tuple(float(v) for v in torch.linalg.norm(aff[:nd, :nd], dim=0))
    return (1.0,) * nd


class _SpacedHD(HausdorffDistanceMetric):
    """``HausdorffDistanceMetric`` taking the spacing of each (channel-first) prediction from its affine."""

    def __call__(self, y_pred, y=None, **kwargs):  # type: ignore[override]
        if isinstance(y_pred, (list, tuple)) and "spacing" not in kwargs:
            # one call per image: each has its own voxel size (results accumulate in the metric buffer)
            return [
                super(_SpacedHD, self).__call__([p], [t], spacing=voxel_spacing(p)) for p, t in zip(y_pred, y)
            ]
        return super().__call__(y_pred, y, **kwargs)


class SpacedHausdorffDistance(IgniteMetricHandler):
    """Ignite handler: (percentile) Hausdorff distance in millimetres, spacing read from each prediction.

    Args:
        include_background: include channel 0 of the one-hot inputs.
        percentile: e.g. 95 for HD95; ``None`` for the maximum.
        reduction: MONAI metric reduction over the batch.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)`` lists of one-hot
            ``(C, X, Y, Z)`` MetaTensors (``monai.handlers.from_engine(["pred", "label"])``).
        save_details: keep per-image values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        include_background: bool = False,
        percentile: float | None = 95,
        reduction: str = "mean",
        output_transform=lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = _SpacedHD(
            include_background=include_background, percentile=percentile, reduction=reduction
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


def threshold_lung_mask(
    hu: np.ndarray, threshold: float = -320.0, min_component_fraction: float = 0.005
) -> np.ndarray:
    """Conventional lung mask of an HU volume: air below ``threshold``, minus the air around the body.

    Steps (scikit-image / SciPy): threshold; per slice, remove the air connected to the slice border
    (outside the body, including the table gap); 3D connected components, keeping components larger
    than ``min_component_fraction`` of the volume (lungs and the airway tree; bowel gas is smaller);
    fill holes per slice (vessels). A sanity reference, not a ground truth.

    Args:
        hu: (X, Y, Z) Hounsfield units.

    Returns:
        (X, Y, Z) uint8 0/1 mask.
    """
    from scipy import ndimage
    from skimage import measure, segmentation

    air = hu < threshold
    body_air = np.zeros_like(air)
    for k in range(air.shape[2]):
        body_air[:, :, k] = segmentation.clear_border(air[:, :, k])
    lab = measure.label(body_air, connectivity=1)
    if lab.max() == 0:
        return np.zeros(hu.shape, dtype=np.uint8)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = np.flatnonzero(sizes >= min_component_fraction * hu.size)
    mask = np.isin(lab, keep)
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask.astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s
