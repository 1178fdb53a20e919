"""Gantry-tilted CT series resampled onto an orthogonal voxel grid.

A tilted acquisition stacks slices whose origins drift in-plane from one slice to the next, so its affine is
sheared: the slice axis is not perpendicular to the slices. Such an affine breaks things silently. NIfTI's
qform cannot hold a shear, so nibabel writes a qform and an sform that disagree and ITK-based viewers
(3D Slicer, ITK-SNAP) read the qform and draw the masks 25-28 mm off the scan; the column norm of the slice
axis (the nominal step along the tilted axis) overstates the distance between planes, and with it every volume.

:func:`correct_gantry_tilt` does what dcm2niix does: each slice is shifted in-plane by its accumulated drift
(linear interpolation, exact for whole-pixel drifts) so that voxel ``(i, j, k)`` of the result lies on the
slice normal through voxel ``(i, j, 0)``; the new slice axis is the normal scaled by the true distance between
planes. The world position of every voxel's content is unchanged; voxels shifted in from outside the
acquired field of view get ``fill`` (air). The matrix size stays the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["TiltCorrection", "correct_gantry_tilt", "slice_shear", "to_acquired_grid"]

#: In-plane drift per slice, as a fraction of the slice step, below which a series counts as untilted
#: (0.01 = 0.57 deg; rounding in exported ImagePositionPatient stays far below it).
MIN_SHEAR = 0.01


@dataclass(frozen=True)
class TiltCorrection:
    """What :func:`correct_gantry_tilt` did: ``tilt_deg`` (angle between the slice axis and the slice normal),
    ``nominal_step_mm`` (distance between consecutive slice origins), ``plane_distance_mm`` (distance between
    the planes, the new slice spacing) and ``drift_voxels`` (in-plane shift per slice, along X and Y)."""

    tilt_deg: float
    nominal_step_mm: float
    plane_distance_mm: float
    drift_voxels: tuple[float, float]

    def note(self) -> str:
        return (
            f"gantry tilt {self.tilt_deg:.1f} deg: resampled onto an orthogonal grid (slices shifted in-plane by "
            f"{self.drift_voxels[0]:.3f}, {self.drift_voxels[1]:.3f} voxels per slice); slice spacing "
            f"{self.plane_distance_mm:.4g} mm between planes, not the nominal {self.nominal_step_mm:.4g} mm; "
            "outputs are on the corrected grid"
        )


def slice_shear(affine: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Split the slice axis of ``affine`` into ``(unit normal, distance between planes, in-plane drift vector)``.

    The normal is the unit vector perpendicular to the first two axes, pointing the way the slices advance.
    """
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    normal = np.cross(m[:, 0], m[:, 1])
    norm = np.linalg.norm(normal)
    if norm == 0:
        raise ValueError("the affine's first two axes are parallel")
    normal /= norm
    distance = float(m[:, 2] @ normal)
    if distance < 0:
        normal, distance = -normal, -distance
    return normal, distance, m[:, 2] - distance * normal


def correct_gantry_tilt(
    volume_xyz: np.ndarray, affine: np.ndarray, fill: float | None = None
) -> tuple[np.ndarray, np.ndarray, TiltCorrection | None]:
    """Resample a sheared ``(X, Y, Z)`` volume onto the orthogonal grid with the same first two axes.

    Args:
        volume_xyz: the slices as stacked, slice ``k`` = ``volume_xyz[:, :, k]``.
        affine: ``(4, 4)`` index -> world, with the tilt as shear in its third column.
        fill: value for voxels that come from outside the acquired field of view (default: the volume's min).

    Returns:
        ``(volume, affine, correction)``; the inputs unchanged and ``None`` when the shear is below
        :data:`MIN_SHEAR` of the slice step.
    """
    aff = np.asarray(affine, dtype=np.float64)
    normal, distance, drift = slice_shear(aff)
    step = float(np.linalg.norm(aff[:3, 2]))
    if volume_xyz.shape[2] < 2 or step == 0 or np.linalg.norm(drift) <= MIN_SHEAR * step:
        return volume_xyz, aff, None
    cols = aff[:3, :2]
    # drift in voxels of the first two axes (they are orthogonal for DICOM: row and column directions)
    per_slice = np.array([drift @ cols[:, a] / (cols[:, a] @ cols[:, a]) for a in range(2)])
    fill_value = float(np.min(volume_xyz)) if fill is None else float(fill)
    # new voxel (i, j, k) sits where old voxel (i - k*dx, j - k*dy, k) is
    out = _shift_slices(volume_xyz, per_slice, order=1, fill=fill_value)
    new_aff = aff.copy()
    new_aff[:3, 2] = normal * distance
    tilt = math.degrees(math.atan2(float(np.linalg.norm(drift)), distance))
    return out, new_aff, TiltCorrection(tilt, step, distance, (float(per_slice[0]), float(per_slice[1])))


def _shift_whole(plane: np.ndarray, shift: np.ndarray, fill: float) -> np.ndarray:
    out = np.full_like(plane, fill)
    src = [slice(max(0, -s), plane.shape[a] - max(0, s)) for a, s in enumerate(shift)]
    dst = [slice(max(0, s), plane.shape[a] - max(0, -s)) for a, s in enumerate(shift)]
    if all(d.start < d.stop for d in dst):
        out[dst[0], dst[1]] = plane[src[0], src[1]]
    return out


def to_acquired_grid(mask_xyz: np.ndarray, drift_voxels) -> np.ndarray:
    """A mask on the corrected grid shifted back onto the acquired (tilted) slices, nearest neighbour: what a
    DICOM SEG referencing the original slices needs (the inverse of :func:`correct_gantry_tilt`)."""
    return _shift_slices(mask_xyz, -np.asarray(drift_voxels, dtype=np.float64), order=0, fill=0)


def _shift_slices(volume_xyz: np.ndarray, per_slice: np.ndarray, order: int, fill: float) -> np.ndarray:
    """Slice ``k`` shifted in-plane by ``k * per_slice`` voxels (``out[p] = in[p - shift]``); whole-voxel shifts
    are exact (no interpolation blur), others use ``scipy.ndimage.shift`` of spline ``order``."""
    from scipy import ndimage

    out = np.empty_like(volume_xyz)
    for k in range(volume_xyz.shape[2]):
        shift = (k * float(per_slice[0]), k * float(per_slice[1]))
        if np.allclose(shift, np.round(shift), atol=1e-6):
            out[:, :, k] = _shift_whole(volume_xyz[:, :, k], np.round(shift).astype(int), fill)
        else:
            out[:, :, k] = ndimage.shift(volume_xyz[:, :, k], shift, order=order, mode="constant", cval=fill)
    return out
