"""DICOM headers: what series choice, geometry and decoding need from each file, read without pixels.

:func:`read_header` reads one file's header with pydicom (``stop_before_pixels``, only :data:`_HEADER_TAGS`
converted) into a :class:`DicomHeader`; a file that is not DICOM gives ``None`` unless it claims to be
DICOM (then :class:`~ctcovid.io.errors.CorruptFileError` names it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom import config
from pydicom.uid import UID

from ctcovid.io.errors import CorruptFileError

__all__ = ["DicomHeader", "header_float", "read_header"]

# The only tags parsed from each header (pydicom skips converting the rest).
_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality",
    "ImageType", "Rows", "Columns", "SamplesPerPixel", "NumberOfFrames", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "RescaleIntercept",
]  # fmt: skip


@dataclass(frozen=True)
class DicomHeader:
    """The header fields of one DICOM file that series choice and geometry need."""

    path: str
    series_uid: str
    sop_uid: str
    modality: str | None
    image_type: tuple[str, ...]
    rows: int | None
    columns: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    transfer_syntax: str
    samples_per_pixel: int
    frames: int
    has_rescale: bool
    series_description: str
    series_number: int | None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def header_float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _int(value, default: int | None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _has_dicm_prefix(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def read_header(path: str | os.PathLike, *, claims_dicom: bool = False) -> DicomHeader | None:
    """Read one file's DICOM header (no pixel data).

    Args:
        path: the file.
        claims_dicom: the caller expects a DICOM file (``.dcm`` name or a file given directly); then a
            file that does not parse raises instead of returning ``None``.

    Returns:
        The header, or ``None`` when the file is not DICOM (no ``DICM`` marker and no DICOM tags) and
        ``claims_dicom`` is False, so folders may hold stray files. DICOM files without an image
        (DICOMDIR, SR) return a header with ``rows=None``, excluded later by :func:`choose_series`.

    Raises:
        CorruptFileError: a file with the DICOM marker (or claimed DICOM) whose header cannot be parsed.
    """
    path = os.fspath(path)
    try:
        prefixed = _has_dicm_prefix(path)
    except OSError as e:
        raise CorruptFileError(path, f"cannot be read ({e})") from e
    # Value validation only warns (e.g. non-numeric UIDs in anonymised data) and is slow: header values
    # are checked by our own rules below.
    with config.disable_value_validation():
        try:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, force=not prefixed, specific_tags=_HEADER_TAGS
            )
        except Exception as e:  # pydicom raises many types on damaged headers
            if prefixed or claims_dicom:
                raise CorruptFileError(
                    path, f"DICOM header cannot be parsed ({type(e).__name__}: {e})"
                ) from e
            return None
        try:
            if not prefixed and "Rows" not in ds and "SOPClassUID" not in ds:
                # force-read bytes that parsed into nothing DICOM-like
                if claims_dicom:
                    raise CorruptFileError(path, "is not a DICOM file (no DICOM image attributes)")
                return None
            sop_class = ds.get("SOPClassUID") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", None)
            if "Rows" not in ds and sop_class is not None and "Image Storage" in UID(str(sop_class)).name:
                # pydicom stops quietly at the end of a truncated file: an image without image attributes
                raise CorruptFileError(
                    path, f"DICOM header is truncated ({UID(str(sop_class)).name} without Rows/Columns)"
                )
            return _header_from_dataset(ds, path)
        except CorruptFileError:
            raise
        except Exception as e:  # a tag value that pydicom cannot convert
            if prefixed or claims_dicom:
                raise CorruptFileError(
                    path, f"DICOM header cannot be parsed ({type(e).__name__}: {e})"
                ) from e
            return None


def _header_from_dataset(ds: pydicom.Dataset, path: str) -> DicomHeader:
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
    image_type = ds.get("ImageType", ())
    if isinstance(image_type, str):
        image_type = (image_type,)
    return DicomHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        modality=(str(ds.Modality).strip().upper() or None) if "Modality" in ds else None,
        image_type=tuple(str(t).strip().upper() for t in image_type),
        rows=_int(ds.get("Rows"), None),
        columns=_int(ds.get("Columns"), None),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        slice_thickness=header_float(ds.get("SliceThickness")),
        transfer_syntax=syntax,
        samples_per_pixel=_int(ds.get("SamplesPerPixel"), 1) or 1,
        frames=_int(ds.get("NumberOfFrames"), 1) or 1,
        has_rescale="RescaleIntercept" in ds,
        series_description=str(ds.get("SeriesDescription", "") or ""),
        series_number=_int(ds.get("SeriesNumber"), None),
    )
