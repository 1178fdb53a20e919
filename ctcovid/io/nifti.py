"""Single NIfTI files (.nii / .nii.gz) via nibabel, kept in stored voxel order.

The affine is nibabel's best affine (sform if set, else qform), the same one MONAI's ``NibabelReader``
uses; ``scl_slope``/``scl_inter`` are applied. A trailing singleton 4th dimension is squeezed.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from ctcovid.io.ct_volume import check_volume_size
from ctcovid.io.errors import CorruptFileError, DimensionalityError, VolumeTooLargeError

__all__ = ["NIFTI_SUFFIXES", "is_nifti", "read_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | os.PathLike, *, allow_2d: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume.

    Returns:
        ``(array, affine)``: float32 (X, Y, Z) in stored order and the (4, 4) index -> RAS affine. A 2D
        image (X, Y) or (X, Y, 1) comes back as (X, Y, 1) when ``allow_2d``.

    Raises:
        CorruptFileError: not a NIfTI file, truncated or corrupt (nibabel/gzip/zlib errors).
        DimensionalityError: a 2D image without ``allow_2d``, or a 4D series of several volumes.
    """
    path = os.fspath(path)
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise CorruptFileError(path, f"is not a NIfTI image (nibabel read it as {type(img).__name__})")
        check_volume_size(img.shape, path)  # from the header: refuse before the data is read
        data = img.get_fdata(dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
    except (CorruptFileError, VolumeTooLargeError):
        raise
    except MemoryError:
        raise
    except Exception as e:  # nibabel, gzip, zlib and OS errors on damaged files
        raise CorruptFileError(path, f"NIfTI file cannot be read ({type(e).__name__}: {e})") from e

    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise DimensionalityError(path, f"has shape {data.shape}; a single 3D CT volume is required")
    if data.shape[2] == 1 and not allow_2d:
        raise DimensionalityError(
            path, f"is a single 2D image (shape {data.shape[:2]}); a CT volume is required"
        )
    return data, affine
