"""Chest radiograph reader: PNG / JPEG (and other Pillow 2D formats) and DICOM radiographs.

:func:`load_xray` returns a grey ``MetaTensor`` of shape ``(1, H, W)`` (rows, columns; channel first), float32
in ``[0, 1]`` with the MONOCHROME2 convention (0 = black = no attenuation, so lungs are dark):

- Pillow images: 8-bit values / 255, 16-bit values / 65535; colour, palette and alpha images are converted to
  grey with Pillow's ITU-R 601-2 luma (alpha is ignored); EXIF orientation is applied.
- DICOM: modality LUT (rescale slope/intercept or LUT) then VOI LUT or window centre/width
  (``pydicom.pixels.apply_modality_lut`` / ``apply_voi_lut``), then scaled by the VOI output range, the same
  range pydicom's windowing maps to. Without a VOI LUT / window the image's own min..max is used, as DICOM
  viewers do. MONOCHROME1 images are inverted to MONOCHROME2. Colour DICOM is converted to grey luma.

Metadata: ``filename_or_obj``, ``source_format`` (``"PNG"``, ``"JPEG"``, ``"DICOM"``, ...),
``original_bit_depth``, ``photometric_interpretation`` (as stored: Pillow mode or DICOM tag),
``intensity_scaling`` (``"bit_depth"``, ``"voi_window"``, ``"voi_lut"``, ``"min_max"``), ``spatial_shape``,
``pixel_spacing`` (mm, row then column, when the file states it) and for DICOM ``modality``, ``view_position``.

Bad input raises a :mod:`ctcovid.io.errors` subclass naming the file and the problem. Like every reader here,
it does not resize or enhance; it only brings the stored grey values to ``[0, 1]``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from ctcovid.io.errors import (
    CorruptFileError,
    DimensionalityError,
    EmptyInputError,
    ImageTooSmallError,
    InputNotFoundError,
    NonFiniteValuesError,
    UnsupportedFormatError,
    UnsupportedTransferSyntaxError,
)

__all__ = ["load_xray", "LoadXRay", "LoadXRayd", "MIN_XRAY_SIDE", "XRAY_EXTENSIONS"]

#: Fewest pixels per side of a radiograph: smaller images (thumbnails, icons, a 1x1 placeholder) would be
#: upsampled to the networks' 224-512 px into a confident answer about nothing.
MIN_XRAY_SIDE = 32

#: File name endings taken to claim an image format (a file with one of these that cannot be read is corrupt,
#: any other unreadable file is an unsupported format).
XRAY_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")

_PIL_PHOTOMETRIC = {"1": "MONOCHROME2", "L": "MONOCHROME2", "LA": "MONOCHROME2", "I": "MONOCHROME2",
                    "I;16": "MONOCHROME2", "I;16B": "MONOCHROME2", "I;16L": "MONOCHROME2", "F": "MONOCHROME2",
                    "P": "PALETTE COLOR", "PA": "PALETTE COLOR"}


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom")


def load_xray(path: str | os.PathLike) -> MetaTensor:
    """Read one chest radiograph as a grey ``(1, H, W)`` float32 ``MetaTensor`` in ``[0, 1]``.

    Raises:
        InputNotFoundError: ``path`` does not exist.
        UnsupportedFormatError: a folder, or a file that is neither a Pillow image nor DICOM.
        CorruptFileError: an empty, truncated or corrupt file (or not the format its name claims).
        UnsupportedTransferSyntaxError: compressed DICOM pixel data that no installed decoder handles.
        DimensionalityError: a multi-frame image or volume where one 2D radiograph is needed.
        EmptyInputError: an image with no pixels.
        NonFiniteValuesError: NaN or infinite pixel values.
        ImageTooSmallError: fewer than :data:`MIN_XRAY_SIDE` pixels on a side.
    """
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(p, "no such file")
    if p.is_dir():
        raise UnsupportedFormatError(p, "is a folder; load_xray reads one radiograph file (PNG, JPEG or DICOM)")
    if p.stat().st_size == 0:
        raise CorruptFileError(p, "file is empty (0 bytes)")
    if _is_dicom(p):
        arr, meta = _read_dicom(p)
    else:
        arr, meta = _read_pil(p)
    if arr.size == 0:
        raise EmptyInputError(p, f"image has no pixels (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise NonFiniteValuesError(p, f"{int((~np.isfinite(arr)).sum())} pixel values are NaN or infinite")
    if min(arr.shape) < MIN_XRAY_SIDE:
        raise ImageTooSmallError(
            p, f"image is {arr.shape[0]}x{arr.shape[1]} pixels; a radiograph needs at least {MIN_XRAY_SIDE} on each side"
        )
    arr = np.clip(arr, 0.0, 1.0).astype(np.float32)
    meta.update(filename_or_obj=str(p), spatial_shape=np.asarray(arr.shape), original_channel_dim=0)
    sr, sc = meta.get("pixel_spacing") or (1.0, 1.0)
    affine = torch.diag(torch.tensor([float(sr), float(sc), 1.0], dtype=torch.float64))
    return MetaTensor(torch.from_numpy(arr[None]), affine=affine, meta=meta)


def _read_pil(p: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    claims_image = p.suffix.lower() in XRAY_EXTENSIONS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(p)
        fmt = img.format or p.suffix.lstrip(".").upper()
        n_frames = getattr(img, "n_frames", 1)
        if n_frames > 1:
            raise DimensionalityError(p, f"{fmt} holds {n_frames} frames; a single 2D radiograph is needed")
        img.load()  # decode now: truncated data fails here, not later
        img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        if claims_image:
            raise CorruptFileError(p, f"cannot be decoded as the {p.suffix} image its name claims") from None
        raise UnsupportedFormatError(p, "unsupported format; expected PNG, JPEG, BMP, TIFF or DICOM") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        if isinstance(e, DimensionalityError):
            raise
        raise CorruptFileError(p, f"truncated or corrupt image ({e})") from None
    mode = img.mode
    meta: dict[str, Any] = {"source_format": fmt, "photometric_interpretation": _PIL_PHOTOMETRIC.get(mode, mode),
                            "original_mode": mode}
    dpi = img.info.get("dpi")
    if dpi and all(float(d) > 0 for d in dpi):
        meta["pixel_spacing"] = (25.4 / float(dpi[1]), 25.4 / float(dpi[0]))  # row, column in mm
    if mode == "1":
        arr, depth, scaling = np.asarray(img, dtype=np.float64), 1, "bit_depth"
    elif mode in ("I;16", "I;16B", "I;16L"):
        arr, depth, scaling = np.asarray(img, dtype=np.float64) / 65535.0, 16, "bit_depth"
    elif mode == "I":
        raw = np.asarray(img, dtype=np.float64)
        if raw.size and (raw.min() < 0 or raw.max() > 65535):
            raise UnsupportedFormatError(p, f"32-bit integer image with values {raw.min():.0f}..{raw.max():.0f}")
        arr, depth, scaling = raw / 65535.0, 16, "bit_depth"
    elif mode == "F":
        arr, depth, scaling = _min_max(np.asarray(img, dtype=np.float64), p), 32, "min_max"
    else:  # L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, ...: 8 bits per channel
        grey = img if mode == "L" else img.convert("L")
        arr, depth, scaling = np.asarray(grey, dtype=np.float64) / 255.0, 8, "bit_depth"
    if arr.ndim != 2:
        raise DimensionalityError(p, f"expected a 2D image, got pixel array of shape {arr.shape}")
    meta.update(original_bit_depth=depth, intensity_scaling=scaling)
    return arr, meta


def _min_max(arr: np.ndarray, p: Path) -> np.ndarray:
    if arr.size == 0:
        return arr
    finite = arr[np.isfinite(arr)]
    if finite.size != arr.size:
        raise NonFiniteValuesError(p, f"{arr.size - finite.size} pixel values are NaN or infinite")
    lo, hi = float(finite.min()), float(finite.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _voi_output_range(ds: Any) -> tuple[float, float]:
    """Output range of the VOI transform, as pydicom's ``apply_voi_lut`` / ``apply_windowing`` define it."""
    if "VOILUTSequence" in ds:
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        lo, hi = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return min(lo, hi), max(lo, hi)


def _read_dicom(p: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    from ctcovid.io.pydicom_compat import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(p, force=p.suffix.lower() in (".dcm", ".dicom"))
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError) as e:
        raise CorruptFileError(p, f"not a readable DICOM file ({e})") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise CorruptFileError(p, "DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DimensionalityError(p, f"multi-frame DICOM with {frames} frames; a single 2D radiograph is needed")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        raw = ds.pixel_array
    except Exception as e:  # pydicom raises RuntimeError/NotImplementedError/ValueError depending on the plugin
        msg = str(e)
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts is not None and ts.is_compressed and any(w in msg.lower() for w in ("plugin", "decod", "handler")):
            raise UnsupportedTransferSyntaxError(
                p, f"cannot decode transfer syntax {ts.name}: {msg} (install pylibjpeg, pylibjpeg-libjpeg, "
                "pylibjpeg-openjpeg or python-gdcm)") from None
        raise CorruptFileError(p, f"DICOM pixel data cannot be read ({msg})") from None
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples == 3 and raw.ndim == 3 and raw.shape[-1] == 3:
        # pydicom returns RGB (YBR converted); ITU-R 601-2 luma like Pillow's convert("L").
        arr = raw.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        depth = int(ds.get("BitsStored", 8))
        arr = arr / float(2**depth - 1)
        scaling = "bit_depth"
    else:
        if raw.ndim != 2:
            raise DimensionalityError(p, f"expected a 2D radiograph, got pixel array of shape {raw.shape}")
        depth = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        try:
            arr = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
            has_lut = "VOILUTSequence" in ds
            has_window = "WindowCenter" in ds and "WindowWidth" in ds
            if has_lut or has_window:
                arr = np.asarray(apply_voi_lut(arr, ds, index=0, prefer_lut=True), dtype=np.float64)
                lo, hi = _voi_output_range(ds)
                arr = (arr - lo) / (hi - lo)
                scaling = "voi_lut" if has_lut else "voi_window"
            else:
                arr = _min_max(arr, p)
                scaling = "min_max"
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
            raise CorruptFileError(p, f"invalid DICOM LUT / window attributes ({e})") from None
        if photometric == "MONOCHROME1":
            arr = 1.0 - arr
    meta: dict[str, Any] = {
        "source_format": "DICOM",
        "photometric_interpretation": photometric,
        "original_bit_depth": depth,
        "intensity_scaling": scaling,
        "modality": str(ds.get("Modality", "")),
        "view_position": str(ds.get("ViewPosition", "")),
    }
    for tag in ("ImagerPixelSpacing", "PixelSpacing"):
        sp = ds.get(tag)
        if sp is not None and len(sp) == 2 and all(float(v) > 0 for v in sp):
            meta["pixel_spacing"] = (float(sp[0]), float(sp[1]))
            break
    return arr, meta


class LoadXRay(Transform):
    """Array-style transform: ``path -> MetaTensor (1, H, W)`` in ``[0, 1]`` (see :func:`load_xray`)."""

    def __call__(self, path: str | os.PathLike) -> MetaTensor:
        return load_xray(path)


class LoadXRayd(MapTransform):
    """Dictionary twin of :class:`LoadXRay`: replaces the paths under ``keys`` by the loaded images.

    Args:
        keys: keys of the paths to load (e.g. ``"image"``, or ``["image", "lung_mask"]``).
        allow_missing_keys: do not fail when a key is absent.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadXRay()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
