"""Pure geometry of a stack of DICOM slices: ordering, step/gap checks and the affine.

No file access here, so every rule can be tested on synthetic header values. Conventions follow DICOM
and ITK/MONAI:

- ``ImageOrientationPatient`` (IOP) holds the row direction cosine (along which the column index ``i``
  grows) then the column direction cosine (along which the row index ``j`` grows), in LPS patient
  coordinates.
- The slice normal is ``row x col``; slices are ordered by ``ImagePositionPatient`` (IPP) projected on
  it (never by file name or InstanceNumber).
- The affine maps array indices ``(i, j, k)`` (column, row, slice) to RAS world millimetres, as MONAI's
  ITK reader does with ``affine_lps_to_ras=True``: LPS affine with its first two rows negated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ctcovid.io.errors import SlicePositionError

__all__ = [
    "LPS_TO_RAS",
    "slice_normal",
    "order_slices",
    "check_slice_distances",
    "dicom_affine_ras",
]

#: Diagonal flip between DICOM/ITK (LPS) and NIfTI/MONAI (RAS) world coordinates.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit slice normal ``row x col`` from the 6 IOP direction cosines.

    Raises:
        ValueError: the cosines are not 6 finite numbers or the two directions are (nearly) parallel/zero.
    """
    iop = np.asarray(orientation, dtype=np.float64)
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
        raise ValueError(f"ImageOrientationPatient must be 6 finite numbers, got {list(orientation)}")
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise ValueError(f"ImageOrientationPatient {list(orientation)} has no defined slice normal")
    return normal / norm


def order_slices(
    positions: np.ndarray | Sequence[Sequence[float]], normal: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Order slices by their position along the slice normal.

    Args:
        positions: (N, 3) IPP of each slice (any order).
        normal: (3,) unit slice normal (see :func:`slice_normal`).

    Returns:
        ``(order, distances)``: ``order`` (N,) indices into ``positions`` sorting them by ascending
        distance along ``normal`` (stable for ties, so duplicates stay adjacent), and ``distances`` (N,)
        those sorted distances in mm.
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    dist = pos @ np.asarray(normal, dtype=np.float64)
    order = np.argsort(dist, kind="stable")
    return order, dist[order]


def _fmt_label(labels: Sequence[str] | None, i: int) -> str:
    return f" ({labels[i]})" if labels is not None else ""


def check_slice_distances(
    distances: np.ndarray | Sequence[float],
    *,
    labels: Sequence[str] | None = None,
    source: str | os.PathLike | None = None,
    rel_tol: float = 0.05,
    abs_tol: float = 0.01,
    duplicate_tol: float = 0.01,
) -> float | None:
    """Check that sorted slice distances are strictly increasing with one uniform step.

    The expected step is the median of the steps no longer than 1.5x the smallest one, so a missing
    slice (a step of about 2x) does not bias it. A step is uniform when it is within
    ``max(abs_tol, rel_tol * step)`` of the expected step; scanners store positions with small rounding
    noise, which this tolerates.

    Args:
        distances: (N,) ascending positions along the slice normal in mm (from :func:`order_slices`).
        labels: optional (N,) names (file names) of the slices in the same order, used in messages.
        source: the series folder, named in the error.
        rel_tol: allowed deviation of a step, relative to the expected step.
        abs_tol: allowed deviation of a step in mm (floor of the tolerance).
        duplicate_tol: two slices closer than this (mm) are at the same position.

    Returns:
        The expected slice step in mm, or ``None`` for fewer than 2 slices.

    Raises:
        SlicePositionError: duplicate positions, missing slices (the message gives the gap: between which
            positions and file names, the expected step and how many slices are missing) or a non-uniform step.
        ValueError: ``distances`` are not sorted or not finite (a programming error, not bad input).
    """
    d = np.asarray(distances, dtype=np.float64).ravel()
    if labels is not None and len(labels) != d.size:
        raise ValueError(f"labels has {len(labels)} entries for {d.size} distances")
    if not np.all(np.isfinite(d)):
        raise ValueError("slice distances must be finite")
    if d.size < 2:
        return None
    diffs = np.diff(d)
    if np.any(diffs < 0):
        raise ValueError("slice distances must be sorted ascending (use order_slices)")

    dup = np.flatnonzero(diffs <= duplicate_tol)
    if dup.size:
        i = int(dup[0])
        more = f"; {dup.size} duplicated positions in all" if dup.size > 1 else ""
        raise SlicePositionError(
            source,
            f"duplicate slice position: slices{_fmt_label(labels, i)} and{_fmt_label(labels, i + 1)} "
            f"both lie at {d[i]:.3f} mm along the slice normal{more}",
        )

    step = float(np.median(diffs[diffs <= 1.5 * diffs.min()]))
    tol = max(abs_tol, rel_tol * step)
    bad = np.flatnonzero(np.abs(diffs - step) > tol)
    if bad.size == 0:
        return step

    change = _spacing_change(diffs, bad, tol)
    if change is not None:
        i, before, after = change
        raise SlicePositionError(
            source,
            f"slice spacing changes from {before:.3f} mm to {after:.3f} mm at position {d[i]:.3f} mm"
            f"{_fmt_label(labels, i)}: the series mixes two slice spacings (two reconstructions or protocols "
            "stored as one series); export a series with one spacing",
        )
    problems = []
    for i in bad[:3]:
        i = int(i)
        gap = float(diffs[i])
        n_step = int(round(gap / step))
        where = f"between positions {d[i]:.3f} mm{_fmt_label(labels, i)} and {d[i + 1]:.3f} mm{_fmt_label(labels, i + 1)}"
        if n_step >= 2 and abs(gap - n_step * step) <= n_step * tol:
            problems.append(
                f"missing slice(s): gap of {gap:.3f} mm {where}, expected step {step:.3f} mm "
                f"(about {n_step - 1} slice(s) missing)"
            )
        else:
            problems.append(f"non-uniform slice step: {gap:.3f} mm {where}, expected step {step:.3f} mm")
    if bad.size > 3:
        problems.append(f"and {bad.size - 3} more irregular step(s)")
    raise SlicePositionError(source, "; ".join(problems))


def dicom_affine_ras(
    first_position: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_vector: Sequence[float],
) -> np.ndarray:
    """4x4 affine from array index ``(i, j, k)`` (column, row, slice) to RAS millimetres.

    Args:
        first_position: IPP (LPS, mm) of slice ``k = 0``.
        orientation: the 6 IOP direction cosines.
        pixel_spacing: DICOM PixelSpacing ``(row spacing, column spacing)``: the distance between rows
            (along the column direction) then between columns (along the row direction).
        slice_vector: LPS displacement (mm) from one slice origin to the next; ``(last - first) / (N - 1)``
            for a series, so a gantry tilt shows up as shear rather than a wrong geometry.
    """
    iop = np.asarray(orientation, dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in pixel_spacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_spacing
    lps[:3, 1] = iop[3:] * row_spacing
    lps[:3, 2] = np.asarray(slice_vector, dtype=np.float64)
    lps[:3, 3] = np.asarray(first_position, dtype=np.float64)
    return LPS_TO_RAS @ lps


def _spacing_change(diffs: np.ndarray, bad: np.ndarray, tol: float) -> tuple[int, float, float] | None:
    """``(index, step before, step after)`` when the irregular steps are one run of three or more equal steps
    reaching an end of the series -- a change of spacing, not missing slices (which are isolated gaps)."""
    if bad.size < 3 or np.any(np.diff(bad) != 1) or not (bad[0] == 0 or bad[-1] == diffs.size - 1):
        return None
    run = diffs[bad]
    if np.ptp(run) > 2 * tol:
        return None
    good = np.delete(diffs, bad)
    regular = float(np.median(good))
    if bad[0] == 0:  # the irregular run comes first
        return int(bad[-1] + 1), float(np.median(run)), regular
    return int(bad[0]), regular, float(np.median(run))
