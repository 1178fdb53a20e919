"""Folders of JPG/PNG slices, one scan per folder (COV19-CT-DB style).

Slices are stacked in natural file-name order (``2.jpg`` before ``10.jpg``); colour images are converted
to grey (ITU-R 601-2 luma, Pillow ``convert("L")``); 16-bit greyscale keeps its values. The physical
spacing is unknown: the affine is ``diag(-1, -1, 1)`` (1 mm, LPS-like like an axial DICOM, so
``image[0, :, :, k].T`` is slice k as stored in the file) and ``meta["spacing_known"]`` is False.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ctcovid.io.errors import CorruptFileError, InconsistentSeriesError

__all__ = ["IMAGE_EXTENSIONS", "natural_sort_key", "read_image_slice", "read_slice_stack", "SLICES_AFFINE"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

#: Affine for slice images: 1 mm, axes like an axial DICOM in RAS terms (x to the patient's left -> "L",
#: y posterior -> "P"); the true spacing and slice direction are unknown.
SLICES_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])

_DIGITS = re.compile(r"(\d+)")


def natural_sort_key(name: str) -> tuple:
    """Sort key splitting digit runs out as integers: ``"2.jpg" < "10.jpg"``, ``"a9" < "a10"``.

    ``re.split`` with a capturing group alternates text and digits, so keys compare text with text and
    integers with integers.
    """
    parts = _DIGITS.split(os.path.basename(name))
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))


def read_image_slice(path: str | os.PathLike) -> np.ndarray:
    """One image file as a 2D float32 (rows, columns) grey array.

    Raises:
        CorruptFileError: not an image Pillow can read, truncated, or not 2D.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            img.load()  # Pillow is lazy: force the decode here so truncation is caught
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
                arr = np.asarray(img)
            else:  # RGB(A), palette, LA, 1-bit ...
                arr = np.asarray(img.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CorruptFileError(path, f"image cannot be read ({type(e).__name__}: {e})") from e
    if arr.ndim != 2:
        raise CorruptFileError(
            path, f"expected a single greyscale or colour image, got array shape {arr.shape}"
        )
    return arr.astype(np.float32)


def read_slice_stack(files: Sequence[str], source: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read image slices in natural name order into a float32 (X, Y, Z) array.

    Returns:
        ``(array, ordered files)``; ``array[:, :, k]`` is the k-th file transposed (X = image columns).

    Raises:
        InconsistentSeriesError: the slices do not all have the same size (names the odd file).
        CorruptFileError: a file cannot be decoded.
    """
    ordered = sorted(files, key=natural_sort_key)
    first = read_image_slice(ordered[0])
    out = np.empty(
        (len(ordered), *first.shape), dtype=np.float32
    )  # (Z, rows, columns), returned as (X, Y, Z)
    out[0] = first
    for k, f in enumerate(ordered[1:], start=1):
        arr = read_image_slice(f)
        if arr.shape != first.shape:
            raise InconsistentSeriesError(
                source,
                f"mixed image sizes: {os.path.basename(f)} is {arr.shape[0]}x{arr.shape[1]} (rows x columns) "
                f"but {os.path.basename(ordered[0])} is {first.shape[0]}x{first.shape[1]}",
            )
        out[k] = arr
    return out.transpose(2, 1, 0), ordered
