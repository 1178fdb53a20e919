"""Volumes not stored axially, turned to the axial frame the networks read and back.

The CT networks run on ``image[0, :, :, k]`` slices, so the third array axis must be the patient's
inferior-superior one. A NIfTI (or a sagittal/coronal DICOM series) stored with another slice axis would be
segmented along the wrong axis: air in front of the chest and bowel gas become "lung". :func:`to_axial`
permutes/flips such a volume to ``LPS`` axis codes (the order a DICOM axial series loads in) with the matching
affine; :func:`to_input_order` takes a mask back to the file's own voxel order and affine, so outputs overlay
the input file voxel for voxel. Axially stored volumes (slice axis S or I) are left exactly as stored.
nibabel's orientation helpers do the index arithmetic.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

__all__ = ["AXIAL_CODES", "axis_codes", "to_axial", "to_input_order"]

#: Axis codes of the reoriented volume: a DICOM axial series' (columns to the patient's left, rows to
#: posterior, slices inferior -> superior).
AXIAL_CODES = ("L", "P", "S")


def axis_codes(affine: np.ndarray) -> str:
    return "".join(str(c) for c in nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def _reorient(array: np.ndarray, affine: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = np.ascontiguousarray(apply_orientation(array, ornt))
    return out, np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(ornt, array.shape)


def to_axial(array_xyz: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """``(array, affine, input codes)``: the volume with its slice axis inferior-superior.

    ``input codes`` is ``""`` when the volume is already axial (returned unchanged), else the input's axis
    codes (e.g. ``"LSP"`` for coronal slices on the third axis), which :func:`to_input_order` needs.
    """
    codes = axis_codes(affine)
    if codes[2] in ("S", "I"):
        return array_xyz, np.asarray(affine, dtype=np.float64), ""
    ornt = ornt_transform(axcodes2ornt(tuple(codes)), axcodes2ornt(AXIAL_CODES))
    out, aff = _reorient(array_xyz, affine, ornt)
    return out, aff, codes


def to_input_order(array_xyz: np.ndarray, affine: np.ndarray, input_codes: str) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`to_axial` for an array on the axial grid (a mask): ``(array, affine)`` in the
    input file's voxel order. ``input_codes`` ``""`` returns the inputs unchanged."""
    if not input_codes:
        return array_xyz, np.asarray(affine, dtype=np.float64)
    ornt = ornt_transform(axcodes2ornt(AXIAL_CODES), axcodes2ornt(tuple(input_codes)))
    return _reorient(array_xyz, affine, ornt)
