"""2D training slices from CT volumes and slice images, for the lung and infection segmenters and the
slice filter.

A datalist item (see ``bundles/ct_lung_segmentation/configs/datalist.json``) is either a volume (NIfTI /
DICOM folder) or one slice image (PNG), with an optional ``label`` (0/1 mask, 0/255 PNG, a label map
with ``label_values``, or any mask with ``label_threshold``: foreground is above it), an optional
``slices`` range ``[start, stop)`` and an optional constant ``slice_label`` for volumes without a mask. :func:`lung_slice_items` loads each item with
:class:`ctcovid.io.LoadCTd`, normalises the **whole volume** with
:class:`ctcovid.transforms.NormalizeCTIntensityd` (as inference does, so display percentiles are those of
the volume, not of one slice), then cuts it into slices resized to the network size. MONAI has no
transform that turns one volume into a list of 2D samples with per-slice labels, hence this module.

Each returned item is a dict:

- ``image``: float32 tensor (1, H, W) in [0, 1] (before augmentation);
- ``label``: float32 tensor (1, H, W) of 0/1 lung (``with_mask``), or the int slice class (without);
- ``lung``: int 0/1, slice is lung if its mask covers at least ``min_area`` of the slice (area measured
  at the source resolution), or the item's ``slice_label``;
- ``lung_fraction``: float, the mask area fraction (-1 when there is no mask);
- ``case``, ``slice``: where the slice came from.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctcovid.io import LoadCTd
from ctcovid.transforms import NormalizeCTIntensityd

from .data_root import default_data_root

__all__ = [
    "load_lung_datalist",
    "resolve_datalist",
    "lung_slice_items",
    "binarize_label",
]

logger = logging.getLogger(__name__)


def resolve_datalist(items: Iterable[Mapping], data_root: str | os.PathLike) -> list[dict]:
    """Copy ``items`` with ``image``/``label`` joined onto ``data_root`` (absolute paths are kept)."""
    root = Path(data_root)
    out = []
    for it in items:
        d = dict(it)
        for key in ("image", "label"):
            if key in d and d[key] is not None:
                d[key] = str(root / d[key])
        out.append(d)
    return out


def load_lung_datalist(
    datalist_file: str | os.PathLike,
    key: str,
    data_root: str | os.PathLike | None = None,
    limit: int | None = None,
    labelled_only: bool = False,
    repeats: Mapping[str, int] | None = None,
) -> list[dict]:
    """Items under ``key`` of a lung datalist JSON, paths resolved against ``data_root``.

    Args:
        datalist_file: the JSON file (``configs/datalist.json``).
        key: ``"training"``, ``"validation"``, ``"test"`` ...
        data_root: folder the relative paths start from; ``None`` -> :func:`default_data_root`.
        limit: keep only the first ``limit`` items of each source (``medseg``, ``ma2020`` ...), for short
            test runs; ``None`` keeps all.
        labelled_only: drop items without a ``label`` (reference mask).
        repeats: ``{source: n}``: each item of that source listed ``n`` times (oversampling: the few whole
            CT volumes, with their lesion-free slices, against a thousand lesion-only 2D slices); the limit
            applies first.
    """
    with open(datalist_file, encoding="utf-8") as f:
        items = json.load(f)[key]
    if labelled_only:
        items = [it for it in items if it.get("label")]
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for it in items:
            src = it.get("source", "")
            if seen.get(src, 0) < limit:
                kept.append(it)
                seen[src] = seen.get(src, 0) + 1
        items = kept
    if repeats:
        items = [it for it in items for _ in range(max(1, int(repeats.get(it.get("source", ""), 1))))]
    return resolve_datalist(items, data_root or default_data_root())


def binarize_label(
    label: torch.Tensor, label_values: Sequence[int] | None = None, threshold: float | None = None
) -> torch.Tensor:
    """0/1 float32 mask from a 0/1 mask, a 0/255 PNG, (with ``label_values``) a label map or (with
    ``threshold``) any mask whose values above ``threshold`` are foreground (MedSeg infection codes 127/255:
    ``threshold=0``)."""
    if threshold is not None:
        return (label > threshold).to(torch.float32)
    if label_values:
        return torch.isin(label.round().to(torch.int64), torch.as_tensor(list(label_values))).to(
            torch.float32
        )
    top = float(label.max()) if label.numel() else 0.0
    return (label > (127.0 if top > 1.0 else 0.5)).to(torch.float32)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, 1, X, Y) -> (N, 1, *size), bilinear (align_corners=False) like the inference preprocessing."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def lung_slice_items(
    items: Sequence[Mapping],
    spatial_size: Sequence[int] = (256, 256),
    min_area: float = 0.01,
    with_mask: bool = True,
    max_slices_per_item: int | None = None,
) -> list[dict]:
    """Expand volume / slice-image datalist items into per-slice training samples.

    Args:
        items: datalist items with absolute paths (:func:`load_lung_datalist`).
        spatial_size: in-plane size (H, W) the slices are resized to.
        min_area: smallest mask area fraction of a "lung" slice (the slice-filter label).
        with_mask: True: ``label`` is the resized lung mask (segmentation). False: ``label`` is the slice
            class, the same 0/1 as ``lung`` (slice classification), and no mask is kept.
        max_slices_per_item: keep at most this many slices per volume, evenly spread (short runs).

    Returns:
        one dict per slice (see the module docstring); a volume contributes ``Z`` slices (or its
        ``slices`` range), a PNG one slice.
    """
    load = LoadCTd(keys=["image", "label"], allow_2d=True, allow_missing_keys=True)
    norm = NormalizeCTIntensityd(keys="image")
    out: list[dict] = []
    for item in items:
        d = load({k: item[k] for k in ("image", "label") if item.get(k)})
        img = norm(d)["image"]
        vol = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)  # (1, X, Y, Z)
        z = vol.shape[-1]
        start, stop = item.get("slices") or (0, z)
        ks = list(range(int(start), min(int(stop), z)))
        if max_slices_per_item is not None and len(ks) > max_slices_per_item:
            ks = [ks[i] for i in np.linspace(0, len(ks) - 1, max_slices_per_item).round().astype(int)]
        x = _resize(vol[0, :, :, ks].permute(2, 0, 1)[:, None].float(), spatial_size)  # (N, 1, H, W)
        if "label" in d:
            lab = d["label"]
            lab = lab.as_tensor() if hasattr(lab, "as_tensor") else torch.as_tensor(lab)
            if lab.shape[1:] != vol.shape[1:]:
                raise ValueError(
                    f"{item['label']}: mask shape {tuple(lab.shape)} != image shape {tuple(vol.shape)}"
                )
            lab = binarize_label(lab[0], item.get("label_values"), item.get("label_threshold"))
            lab = lab[:, :, ks]  # (X, Y, N)
            frac = lab.mean(dim=(0, 1))
            y = (_resize(lab.permute(2, 0, 1)[:, None], spatial_size) > 0.5).to(torch.float32)
        else:
            frac, y = None, None
        for i, k in enumerate(ks):
            s = {"image": x[i].clone(), "case": str(item.get("case", item["image"])), "slice": int(k)}
            s["equalised"] = bool(item.get("equalised", False))  # a CLAHE image already (every sample: collation)
            if frac is not None:
                s["lung_fraction"] = float(frac[i])
                s["lung"] = int(float(frac[i]) >= min_area and float(frac[i]) > 0)
                if with_mask:
                    s["label"] = y[i].clone()
            else:
                s["lung_fraction"] = -1.0
                if "slice_label" not in item:
                    raise ValueError(f"{item['image']}: no lung mask and no slice_label")
                if with_mask and int(item["slice_label"]) == 0:  # known non-lung slice: empty mask
                    s["label"] = torch.zeros_like(s["image"])
            if "slice_label" in item:
                s["lung"] = int(item["slice_label"])
            if not with_mask:
                s["label"] = s["lung"]
            out.append(s)
    logger.info("lung_slice_items: %d slices from %d items", len(out), len(items))
    return out
