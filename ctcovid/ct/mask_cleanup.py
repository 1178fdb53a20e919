"""The lung mask's clean-up: the segmenter bundle's own label post-processing, run fast on the 3D mask.

The transforms are MONAI's, instantiated from the bundle's ``postprocessing`` (so the pipeline's mask is
the bundle's mask). Two things are done by hand because MONAI has no cheaper path (issue 9): the clean-up
runs on the mask's bounding box, and the common case (``KeepLargestConnectedComponentd`` on a 0/1 mask)
labels with 16-bit scipy labels instead of MONAI's 64-bit ones -- the same result, 1.7-4x faster, about a
third of the memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ctcovid.bundle.loading import StageModel

__all__ = [
    "MASK_POSTPROCESSING",
    "as_bool_mask",
    "binary_keep_largest_args",
    "bounding_box",
    "clean_mask",
    "keep_largest_components",
    "label_components",
    "mask_postprocessing",
    "row_blocks",
]

#: Label-map clean-up transforms of the segmenter bundle's postprocessing that the pipeline applies too.
MASK_POSTPROCESSING = ("KeepLargestConnectedComponentd", "RemoveSmallObjectsd", "FillHolesd", "LabelFilterd")


def mask_postprocessing(segmenter: StageModel) -> list:
    """Label-map clean-up transforms of the segmenter bundle's ``postprocessing`` (e.g.
    ``KeepLargestConnectedComponentd``), instantiated from its config; activation, inversion, arg-max and
    saving are done by the pipeline in-process instead."""
    config = segmenter.config
    if config is None or "postprocessing" not in config:
        return []
    raw = config["postprocessing"]
    items = raw.get("transforms", []) if isinstance(raw, dict) else []
    out = []
    for i, item in enumerate(items):
        target = str(item.get("_target_", "")) if isinstance(item, dict) else ""
        if target.split(".")[-1] in MASK_POSTPROCESSING:
            transform = config.get_parsed_content(f"postprocessing#transforms#{i}")
            if transform is not None:  # None: switched off by the config's "_disabled_"
                out.append(transform)
    return out


def clean_mask(mask: np.ndarray, transforms: Sequence) -> np.ndarray:
    """Apply the clean-up ``transforms`` (from :func:`mask_postprocessing`) to the ``(X, Y, Z)`` uint8 mask.

    Run on the mask's bounding box plus a one-voxel background margin, which gives the same result as
    on the whole volume for these transforms (components and holes live inside the box; the margin
    stands for the background outside it) at a fraction of the cost: MONAI's connected-component
    labelling of a 300x512x512 mask takes ~3 s and ~1 GB, of the lungs' box typically a quarter.
    """
    if not transforms:
        return mask
    box = bounding_box(mask, margin=1)
    if box is None:  # empty mask: nothing to clean
        return mask
    sub = np.ascontiguousarray(mask[box])
    for transform in transforms:
        args = binary_keep_largest_args(transform, sub)
        if args is not None:
            sub = keep_largest_components(sub, *args)
            continue
        d = transform({key: torch.from_numpy(sub)[None] for key in transform.keys})
        sub = np.asarray(torch.as_tensor(d[transform.keys[0]])[0].cpu(), dtype=np.uint8)
    mask[box] = sub
    return mask


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every non-zero voxel, grown by ``margin`` within the array;
    ``None`` for an empty mask."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(max(0, hits[0] - margin), min(mask.shape[axis], hits[-1] + 1 + margin)))
    return tuple(box)


def binary_keep_largest_args(transform, mask: np.ndarray) -> tuple[int, int] | None:
    """``(num_components, connectivity)`` when ``transform`` is MONAI's ``KeepLargestConnectedComponentd``
    applied to label 1 of a 0/1 mask (the segmenter bundle's clean-up), else ``None``."""
    from monai.transforms import KeepLargestConnectedComponentd

    if not isinstance(transform, KeepLargestConnectedComponentd):
        return None
    t = transform.converter
    if (
        t.is_onehot
        or (t.applied_labels is not None and tuple(t.applied_labels) != (1,))
        or mask.max(initial=0) > 1
    ):
        return None
    return int(t.num_components), int(t.connectivity or mask.ndim)


def keep_largest_components(mask: np.ndarray, num_components: int, connectivity: int) -> np.ndarray:
    """The ``num_components`` largest connected components of a 0/1 mask, as MONAI's
    ``KeepLargestConnectedComponent`` computes them (same labelling, ranking and connectivity), with
    16-bit labels when they suffice (else 32-bit): on a 300x512x512 mask about 3x faster and with a sixth
    to a third of the memory of MONAI's 64-bit labelling (issue 9)."""
    from scipy import ndimage

    labels, count = label_components(mask, ndimage.generate_binary_structure(mask.ndim, connectivity))
    if count <= num_components:
        return mask
    # bincount and fancy indexing copy their 16/32-bit labels to int64: done in slabs, so the copies stay small
    slabs = row_blocks(labels, 32)
    sizes = np.zeros(count + 1, dtype=np.int64)
    for slab in slabs:
        sizes += np.bincount(labels[slab].ravel(), minlength=count + 1)
    sizes[0] = 0  # background
    keep = np.zeros(count + 1, dtype=np.uint8)
    keep[np.argsort(sizes)[::-1][:num_components]] = 1
    out = np.empty(labels.shape, dtype=np.uint8)
    for slab in slabs:
        out[slab] = keep[labels[slab]]
    return out


def label_components(mask: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """scipy's connected components of ``mask`` with 16-bit labels when they suffice, else 32-bit (a quarter
    or half of the memory of scipy's default labels)."""
    from scipy import ndimage

    try:
        return ndimage.label(mask, structure=structure, output=np.uint16)
    except RuntimeError as e:  # more than 65535 provisional labels: scipy says so before writing any
        if "bit-depth" not in str(e):
            raise
        return ndimage.label(mask, structure=structure, output=np.int32)


def row_blocks(volume: np.ndarray, rows: int = 16) -> list[slice]:
    """Slices of ``rows`` first-axis rows covering ``volume``: blocks of contiguous memory (C order) for work
    whose whole-volume temporaries would cost too much."""
    return [slice(i, i + rows) for i in range(0, volume.shape[0], rows)]


def as_bool_mask(mask: np.ndarray) -> np.ndarray:
    """A 0/1 uint8 mask viewed as bool (no copy); any other mask compared with 0."""
    if mask.dtype == np.uint8 and mask.max(initial=0) <= 1:
        return mask.view(bool)
    return mask > 0
