"""Decoding a DICOM CT series' pixels to float32 HU, slice by slice in the checked order.

Each file's ``stored * RescaleSlope + RescaleIntercept`` is applied. SimpleITK/GDCM decodes fastest (JPEG
lossless and JPEG 2000 included; it applies each file's rescale); pydicom (+ pylibjpeg) is the fallback
and the alternative backend. Transfer syntaxes are checked before decoding
(:func:`check_transfer_syntaxes`), so an undecodable one raises
:class:`~ctcovid.io.errors.UnsupportedTransferSyntaxError` naming the package to install.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pydicom
from pydicom import config
from pydicom.uid import UID

from ctcovid.io.ct_volume import c_order_xyz
from ctcovid.io.dicom_headers import DicomHeader, header_float
from ctcovid.io.dicom_prefetch import SeriesPrefetch, float32_series_reader, gdcm_warnings_off
from ctcovid.io.errors import CorruptFileError, UnsupportedTransferSyntaxError
from ctcovid.io.pydicom_compat import decoder_status

__all__ = ["Backend", "check_transfer_syntaxes", "decode_series"]

logger = logging.getLogger(__name__)

Backend = Literal["auto", "sitk", "pydicom"]

_UNCOMPRESSED = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (retired)
}
# Syntaxes GDCM (inside SimpleITK) decodes: uncompressed, JPEG, JPEG-LS, JPEG 2000, RLE.
_SITK_DECODABLE = _UNCOMPRESSED | {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
}
# What to install, per family of compressed syntaxes (pydicom's decoders need these plugins).
_INSTALL_HINTS = {
    (
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
    ): ("pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),
    ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"): (
        "pip install pylibjpeg pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)"
    ),
    (
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    ): "pip install pylibjpeg pylibjpeg-openjpeg (or Pillow built with OpenJPEG, or python-gdcm)",
    ("1.2.840.10008.1.2.5",): "pip install pylibjpeg pylibjpeg-rle",
}
_VIDEO_PREFIXES = ("1.2.840.10008.1.2.4.10",)  # MPEG-2, MPEG-4, HEVC (4.100 .. 4.108)


def _pydicom_decoder_status(uid: str) -> tuple[bool, str]:
    """(pydicom can decode ``uid`` now, text naming what is missing)."""
    if uid in _UNCOMPRESSED:
        return True, ""
    try:
        return decoder_status(uid)
    except Exception as e:  # unexpected API change: report, do not crash
        return False, f"pydicom decoder lookup failed ({e})"


def _syntax_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else "unknown transfer syntax"


def check_transfer_syntaxes(headers: Sequence[DicomHeader], backend: Backend) -> Backend:
    """Check every file's transfer syntax can be decoded; return the backend to use (``auto`` resolved).

    Raises:
        UnsupportedTransferSyntaxError: names the syntax, the first file using it and what to install.
    """
    by_syntax: dict[str, str] = {}
    for h in headers:
        by_syntax.setdefault(h.transfer_syntax, h.path)
    sitk_ok = all(uid in _SITK_DECODABLE for uid in by_syntax)
    if backend == "auto":
        backend = "sitk" if sitk_ok else "pydicom"
    for uid, path in by_syntax.items():
        if backend == "sitk" and uid in _SITK_DECODABLE:
            continue
        ok, missing = _pydicom_decoder_status(uid)
        if ok:
            continue
        name = _syntax_name(uid)
        if uid.startswith(_VIDEO_PREFIXES):
            hint = "it is a video encoding with no Python decoder; re-export the series as uncompressed, JPEG or JPEG 2000 DICOM"
        else:
            hint = next((h for uids, h in _INSTALL_HINTS.items() if uid in uids), None)
            hint = (
                f"install a decoder: {hint}"
                if hint
                else "no known decoder; re-export the series uncompressed"
            )
        raise UnsupportedTransferSyntaxError(
            path, f"transfer syntax {name} ({uid}) cannot be decoded ({missing}); {hint}"
        )
    return backend


def _decode_one_pydicom(h: DicomHeader) -> np.ndarray:
    """One slice as float32 (rows, columns) with the file's own rescale applied."""
    try:
        with config.disable_value_validation():
            ds = pydicom.dcmread(h.path)
            stored = ds.pixel_array
    except Exception as e:  # pydicom / plugin errors on truncated or corrupt data
        raise CorruptFileError(
            h.path, f"pixel data cannot be decoded, truncated or corrupt file ({type(e).__name__}: {e})"
        ) from e
    if stored.shape != (h.rows, h.columns):
        raise CorruptFileError(
            h.path, f"decoded pixel data has shape {stored.shape}, header says {h.rows}x{h.columns}"
        )
    slope = header_float(ds.get("RescaleSlope", 1.0))
    intercept = header_float(ds.get("RescaleIntercept", 0.0))
    out = stored.astype(np.float32)
    if slope is not None and slope != 1.0:
        out *= np.float32(slope)
    if intercept:
        out += np.float32(intercept)
    return out


def _decode_pydicom(headers: Sequence[DicomHeader]) -> np.ndarray:
    rows, cols = headers[0].rows, headers[0].columns
    out = np.empty((len(headers), rows, cols), dtype=np.float32)
    for k, h in enumerate(headers):
        out[k] = _decode_one_pydicom(h)
    return out


def _decode_sitk(headers: Sequence[DicomHeader]) -> tuple[object, np.ndarray]:
    """(SimpleITK image, (Z, Y, X) view of its buffer): keep the image while the view is used."""
    import SimpleITK as sitk

    reader = float32_series_reader(sitk, [h.path for h in headers])  # our order, not GDCM's
    with gdcm_warnings_off(sitk):
        image = reader.Execute()
    arr = sitk.GetArrayViewFromImage(image)
    expected = (len(headers), headers[0].rows, headers[0].columns)
    if arr.shape != expected:
        raise RuntimeError(f"SimpleITK returned shape {arr.shape}, expected {expected}")
    return image, arr


def decode_series(
    headers: Sequence[DicomHeader], backend: Backend = "auto", prefetch: SeriesPrefetch | None = None
) -> tuple[np.ndarray, str]:
    """Decode ordered slices to a float32 (X, Y, Z) array in rescaled units (HU for CT).

    Args:
        headers: the slices in array order (from :func:`check_series_geometry`).
        backend: ``"sitk"`` (SimpleITK/GDCM, fastest), ``"pydicom"`` or ``"auto"`` (sitk when GDCM
            handles every transfer syntax).
        prefetch: a SimpleITK decode of the folder started before the headers were checked: its pixels are
            used when it holds these files (the sitk backend only; it is cancelled otherwise). The caller
            cancels it when it stops before decoding.

    Returns:
        ``(array, backend used)``; ``array[i, j, k]`` is column i, row j of slice k; C-contiguous.

    Raises:
        UnsupportedTransferSyntaxError, CorruptFileError (truncated/corrupt pixel data, names the file).
    """
    backend = check_transfer_syntaxes(headers, backend)
    if prefetch is not None and backend != "sitk":
        prefetch.cancel()  # pydicom decodes: stop GDCM now
    zyx = prefetch.take(headers) if prefetch is not None and backend == "sitk" else None
    image = None  # the SimpleITK image whose buffer zyx views, when _decode_sitk decodes
    if zyx is None and backend == "sitk":
        try:
            image, zyx = _decode_sitk(headers)
        except RuntimeError as e:
            # GDCM's message rarely names the file: decode with pydicom to find it (or succeed).
            logger.warning(
                "SimpleITK could not decode the series (%s); decoding with pydicom", str(e).strip()[:200]
            )
            if not all(_pydicom_decoder_status(h.transfer_syntax)[0] for h in headers):
                raise CorruptFileError(
                    os.path.dirname(headers[0].path),
                    f"pixel data cannot be decoded (SimpleITK: {str(e).strip()[:300]})",
                ) from e
            zyx, backend = _decode_pydicom(headers), "pydicom"
    elif zyx is None:
        zyx = _decode_pydicom(headers)
    xyz = c_order_xyz(zyx.transpose(2, 1, 0))  # the one copy, made while the decoded buffer is alive
    del zyx, image
    if prefetch is not None:
        prefetch.cancel()  # frees its decoded image now: the volume is not held twice past this point
    return xyz, backend
