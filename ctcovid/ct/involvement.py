"""Lung involvement: how much of each lung the lesions take, and the CT-0..CT-4 grade radiologists give it.

The grade follows the MosMedData convention (Morozov et al. 2020): CT-0 no lesion, CT-1 < 25 % of the lung
involved, CT-2 25-50 %, CT-3 50-75 %, CT-4 >= 75 %. Involvement is ``|infection ∩ lung| / |lung| × 100``.

Left and right lungs come from the lung mask's 3D components placed by the scan's affine (RAS: the patient's
right lung lies at larger world x). When the two lungs touch and form one component, a sagittal plane at
the middle of the mask's left-right extent splits them. Written here because no library names the lungs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctcovid.ct.mask_cleanup import as_bool_mask, bounding_box, label_components, row_blocks

__all__ = [
    "GRADE_UPPER_BOUNDS",
    "ct_severity_grade",
    "involvement_percent",
    "lesions_beyond_lung",
    "lung_hull",
    "overlap_voxels",
    "per_lung_voxels",
    "percent_of",
    "split_lungs",
]

#: Upper bounds (percent of lung, exclusive) of CT-1, CT-2 and CT-3; CT-4 is everything from 75 % on.
GRADE_UPPER_BOUNDS: tuple[tuple[float, str], ...] = ((25.0, "CT-1"), (50.0, "CT-2"), (75.0, "CT-3"))


def ct_severity_grade(percent: float | None, lesion_found: bool) -> str | None:
    """``"CT-0"`` without a lesion, else the MosMed grade of ``percent`` involvement (``None`` if unknown)."""
    if not lesion_found:
        return "CT-0"
    if percent is None or not np.isfinite(percent):
        return None
    for bound, grade in GRADE_UPPER_BOUNDS:
        if percent < bound:
            return grade
    return "CT-4"


def involvement_percent(infection: np.ndarray, lung: np.ndarray) -> float | None:
    """``|infection ∩ lung| / |lung| × 100``; ``None`` for an empty lung."""
    n = int(np.count_nonzero(lung))
    return percent_of(overlap_voxels(infection, lung) if n else 0, n)


def percent_of(infected_voxels: int, lung_voxels: int) -> float | None:
    """``infected_voxels / lung_voxels × 100`` from counts; ``None`` for an empty lung."""
    return 100.0 * infected_voxels / lung_voxels if lung_voxels else None


def overlap_voxels(a: np.ndarray, b: np.ndarray) -> int:
    """``count_nonzero(a & b)`` for masks of one shape, 16 first-axis rows at a time (no whole-volume
    temporary; rows are contiguous in C order)."""
    return sum(int(np.count_nonzero(np.logical_and(a[rows], b[rows]))) for rows in row_blocks(a))


def lung_hull(lung: np.ndarray, slices: Sequence[int] | None = None) -> np.ndarray:
    """``(X, Y, Z)`` bool: on each slice, the convex hull of each lung outline (scikit-image).

    Dense consolidation at the lung's edge can fall outside a lung segmenter's mask and leave a notch in
    the outline; the hull of each lung puts it back inside, so lesions found there count as lung. Hulls are
    taken per 2D object (never across the mediastinum between the lungs). ``slices``: only these (default:
    the slices with lung).
    """
    from scipy import ndimage
    from skimage.morphology import convex_hull_image

    out = np.zeros(lung.shape, dtype=bool)
    ks = np.flatnonzero(lung.any(axis=(0, 1))) if slices is None else slices
    eight = np.ones((3, 3), dtype=bool)
    for k in ks:
        plane = lung[:, :, k] > 0
        labels, _ = ndimage.label(plane, structure=eight)  # objects as skimage's convex_hull_object finds them
        for i, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
            # each object's hull within the object's own box (plus one pixel): the hull cannot leave it, and
            # the point-in-polygon test is over a fraction of the slice (the same pixels, 2x less work)
            r0, c0 = max(rows.start - 1, 0), max(cols.start - 1, 0)
            r1, c1 = min(rows.stop + 1, plane.shape[0]), min(cols.stop + 1, plane.shape[1])
            out[r0:r1, c0:c1, k] |= convex_hull_image(labels[r0:r1, c0:c1] == i)
    return out


#: A lesion (2D component) at least this much inside a lung's outline is kept whole where it reaches beyond it:
#: consolidation against the chest wall pushes the aerated lung, and so its convex hull, back from the pleura.
STRADDLING_LESION_INSIDE = 0.5


def lesions_beyond_lung(found: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """``(X, Y)`` bool: the lesion pixels of one slice outside the lung mask that count as lung.

    Those inside the convex hull of a lung outline (:func:`lung_hull`), and every pixel of a lesion (8-connected
    component of ``found``) that lies at least :data:`STRADDLING_LESION_INSIDE` inside mask or hull.
    """
    from scipy import ndimage

    outline = lung | lung_hull(lung[:, :, None])[:, :, 0]
    beyond = found & ~lung
    added = beyond & outline
    labels, n = ndimage.label(found, structure=np.ones((3, 3), dtype=bool))
    if n:
        area = np.bincount(labels.ravel(), minlength=n + 1)
        inside = np.bincount(labels.ravel(), weights=outline.ravel(), minlength=n + 1)
        straddling = inside >= STRADDLING_LESION_INSIDE * np.maximum(area, 1)
        straddling[0] = False
        added |= beyond & straddling[labels]
    return added


def _right_in_box(lung: np.ndarray, affine: np.ndarray | None, min_share: float):
    """``(box, sub, right_sub)``: the lung mask's bounding box, the bool mask inside it and which of its
    voxels are the right lung; ``None`` for an empty mask (see :func:`split_lungs`)."""
    lung = as_bool_mask(lung)
    a = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    box = bounding_box(lung)
    if box is None:
        return None
    # work inside the lungs' box (labelling a 512x512x300 volume costs seconds), in slabs along x: a dense
    # world-x volume and scipy's float64 per-label means cost 2.6 GB on a 1000-slice scan (issue 15)
    sub = lung[box]
    i, j, k = (np.arange(b.start, b.stop, dtype=np.float64) for b in box)
    slabs = row_blocks(sub)

    def world_x(slab: slice) -> np.ndarray:  # RAS x (larger = patient's right) of the slab's voxels, float32
        x = a[0, 0] * i[slab, None, None] + a[0, 1] * j[None, :, None] + a[0, 2] * k[None, None, :]
        return x.astype(np.float32)

    labels, n = label_components(sub)
    sizes = np.zeros(n + 1, dtype=np.int64)
    x_sums = np.zeros(n + 1, dtype=np.float64)
    lo, hi = np.inf, -np.inf
    for slab in slabs:
        lab, wx = labels[slab].ravel(), world_x(slab).ravel()
        sizes += np.bincount(lab, minlength=n + 1)
        x_sums += np.bincount(lab, weights=wx, minlength=n + 1)
        inside = wx[lab > 0]
        if inside.size:
            lo, hi = min(lo, float(inside.min())), max(hi, float(inside.max()))
    sizes[0] = 0
    order = np.argsort(sizes[1:])[::-1] + 1
    total = int(sizes.sum())
    right_sub = np.zeros_like(sub)
    if n >= 2 and sizes[order[1]] >= min_share * total:
        means = x_sums / np.maximum(sizes, 1)
        cut = (means[order[0]] + means[order[1]]) / 2.0
        right_label = means >= cut  # every component goes wholly to the side of its centroid
        right_label[0] = False
        for slab in slabs:
            right_sub[slab] = right_label[labels[slab]]
    else:  # the lungs touch: cut at the middle of the mask's left-right extent
        for slab in slabs:
            right_sub[slab] = sub[slab] & (world_x(slab) >= (lo + hi) / 2.0)
    return box, sub, right_sub


def split_lungs(
    lung: np.ndarray, affine: np.ndarray | None, min_share: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """``(right, left)`` bool masks of a ``(X, Y, Z)`` lung mask.

    Args:
        lung: the lung mask.
        affine: ``(4, 4)`` voxel -> RAS mm (``None``: the identity, i.e. voxel x grows to the patient's right).
        min_share: the two largest 3D components are the two lungs when each holds at least this share of
            the mask; otherwise the lungs touch and the mask is cut at the middle of its left-right extent.
    """
    lung = as_bool_mask(lung)
    right, left = np.zeros_like(lung), np.zeros_like(lung)
    found = _right_in_box(lung, affine, min_share)
    if found is not None:
        box, sub, right_sub = found
        right[box] = right_sub
        left[box] = sub & ~right_sub
    return right, left


def per_lung_voxels(
    lung: np.ndarray, infection: np.ndarray, affine: np.ndarray | None, min_share: float = 0.15
) -> dict[str, tuple[int, int]]:
    """``{"right": (lung voxels, infection ∩ lung voxels), "left": (...)}``: the counts of :func:`split_lungs`'
    two masks, computed inside the lungs' box without building them (two whole-volume masks cost 90 MB
    of fresh pages per 167-slice scan, most of the involvement step's time)."""
    found = _right_in_box(lung, affine, min_share)
    if found is None:
        return {"right": (0, 0), "left": (0, 0)}
    box, sub, right_sub = found
    inf = as_bool_mask(infection)[box]
    n_right, n_lung = int(np.count_nonzero(right_sub)), int(np.count_nonzero(sub))
    inf_right = overlap_voxels(inf, right_sub)
    return {"right": (n_right, inf_right), "left": (n_lung - n_right, overlap_voxels(inf, sub) - inf_right)}
