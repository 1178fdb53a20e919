"""DICOM CT series: header scan, series choice, slice ordering checks and pixel decoding.

Steps (each explicit and ours; only the pixel decoding is delegated):

1. :func:`read_header` reads every file's header with pydicom (``stop_before_pixels``).
2. :func:`choose_series` groups by SeriesInstanceUID, drops localizers, non-CT modalities, colour and
   multi-frame images, prefers ORIGINAL/PRIMARY series and picks the one with the most slices
   (after dropping byte-identical copies of the same SOP instance). The choice and the reasons are
   logged and returned as a note.
3. :func:`check_series_geometry` checks constant size / orientation / pixel spacing, orders slices by
   IPP along the slice normal and checks the step (see :mod:`ctcovid.io.slice_geometry`).
4. :func:`decode_series` decodes each slice once, in that order, to float32 HU
   (``stored * RescaleSlope + RescaleIntercept`` of each file). SimpleITK/GDCM decodes fastest
   (JPEG lossless and JPEG 2000 included; it applies each file's rescale); pydicom (+ pylibjpeg) is the
   fallback and the alternative backend. Transfer syntaxes are checked before decoding, so an
   undecodable one raises :class:`UnsupportedTransferSyntaxError` naming the package to install.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pydicom
from pydicom import config
from pydicom.uid import UID

from ctcovid.io.errors import (
    CorruptFileError,
    InconsistentSeriesError,
    NoCTSeriesError,
    SlicePositionError,
    UnsupportedFormatError,
    UnsupportedTransferSyntaxError,
)
from ctcovid.io.pydicom_compat import decoder_status
from ctcovid.io.slice_geometry import check_slice_distances, dicom_affine_ras, order_slices, slice_normal

__all__ = [
    "DicomHeader",
    "SeriesGeometry",
    "read_header",
    "choose_series",
    "check_series_geometry",
    "check_transfer_syntaxes",
    "decode_series",
    "Backend",
]

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
# The only tags parsed from each header (pydicom skips converting the rest).
_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality",
    "ImageType", "Rows", "Columns", "SamplesPerPixel", "NumberOfFrames", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "RescaleIntercept",
]  # fmt: skip
_VIDEO_PREFIXES = ("1.2.840.10008.1.2.4.10",)  # MPEG-2, MPEG-4, HEVC (4.100 .. 4.108)


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


@dataclass(frozen=True)
class SeriesGeometry:
    """A checked, ordered series: ``headers`` in slice order (k = 0 .. N-1) and its RAS affine."""

    headers: tuple[DicomHeader, ...]
    affine: np.ndarray
    step: float | None
    spacing_known: bool


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _float(value) -> float | None:
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
        slice_thickness=_float(ds.get("SliceThickness")),
        transfer_syntax=syntax,
        samples_per_pixel=_int(ds.get("SamplesPerPixel"), 1) or 1,
        frames=_int(ds.get("NumberOfFrames"), 1) or 1,
        has_rescale="RescaleIntercept" in ds,
        series_description=str(ds.get("SeriesDescription", "") or ""),
        series_number=_int(ds.get("SeriesNumber"), None),
    )


def _exclusion_reason(h: DicomHeader) -> str | None:
    """Why a file cannot be a slice of a CT volume, or None if it can."""
    if h.modality is not None and h.modality != "CT":
        return f"modality {h.modality}"
    if "LOCALIZER" in h.image_type:
        return "localizer"
    if h.rows is None or h.columns is None:
        return "no image (no Rows/Columns)"
    if h.samples_per_pixel != 1:
        return f"colour image ({h.samples_per_pixel} samples per pixel)"
    if h.frames > 1:
        return f"multi-frame image ({h.frames} frames)"
    return None


def _same_bytes(a: str, b: str) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False

    def digest(p: str) -> bytes:
        with open(p, "rb") as f:
            return hashlib.sha1(f.read()).digest()

    return digest(a) == digest(b)


def _drop_exact_copies(headers: list[DicomHeader]) -> tuple[list[DicomHeader], list[str]]:
    """Drop files that are byte-identical copies of the same SOP instance (kept: first by path)."""
    by_sop: dict[str, list[DicomHeader]] = defaultdict(list)
    for h in sorted(headers, key=lambda h: h.path):
        by_sop[h.sop_uid].append(h)
    kept, dropped = [], []
    for sop, group in by_sop.items():
        if not sop or len(group) == 1:
            kept.extend(group)
            continue
        first = group[0]
        kept.append(first)
        for other in group[1:]:
            if _same_bytes(first.path, other.path):
                dropped.append(other.name)
            else:  # same UID, different content: keep it, the position check then reports the clash
                kept.append(other)
    return kept, dropped


def _describe(uid: str, hs: Sequence[DicomHeader]) -> str:
    h = hs[0]
    desc = f" '{h.series_description}'" if h.series_description else ""
    num = f" #{h.series_number}" if h.series_number is not None else ""
    return f"series{num}{desc} ({uid or 'no SeriesInstanceUID'}, {len(hs)} slice(s))"


def choose_series(headers: Sequence[DicomHeader], source: str | os.PathLike) -> tuple[list[DicomHeader], str]:
    """Pick the CT series to read from a folder's headers.

    Rules: files with a non-CT Modality, localizers, colour or multi-frame images and files without
    pixel rows are dropped; a missing Modality is accepted with a warning (minimal exports such as
    lungmask's test data). Series whose ImageType is ORIGINAL/PRIMARY (or absent) are preferred over
    DERIVED/SECONDARY ones (used only if nothing else is left, with a warning). Byte-identical copies of
    one SOP instance count once. The series with the most slices wins; ties go to the lowest
    SeriesNumber, then UID.

    Returns:
        ``(headers of the chosen series, note)``; the note says which series was chosen and why and is
        also logged at INFO level.

    Raises:
        NoCTSeriesError: no file can be a CT slice; the message lists what was found.
        UnsupportedFormatError: the only candidates are multi-frame (enhanced) images.
    """
    groups: dict[str, list[DicomHeader]] = defaultdict(list)
    excluded: Counter[str] = Counter()
    for h in headers:
        reason = _exclusion_reason(h)
        if reason is None:
            groups[h.series_uid].append(h)
        else:
            excluded[reason] += 1
    if not groups:
        found = ", ".join(f"{n} file(s) {r}" for r, n in excluded.most_common()) or "no DICOM images"
        if excluded and all(r.startswith("multi-frame") for r in excluded):
            raise UnsupportedFormatError(
                source,
                f"holds only multi-frame (enhanced) DICOM images ({found}); not supported, export a classic one-file-per-slice series",
            )
        raise NoCTSeriesError(source, f"no CT image series found ({found})")

    deduped: dict[str, list[DicomHeader]] = {}
    copies: list[str] = []
    for uid, hs in groups.items():
        deduped[uid], dropped = _drop_exact_copies(hs)
        copies.extend(dropped)

    def is_original(hs: Sequence[DicomHeader]) -> bool:
        types = hs[0].image_type
        return not types or ("ORIGINAL" in types and "PRIMARY" in types)

    original = {u: hs for u, hs in deduped.items() if is_original(hs)}
    notes = []
    pool = original
    if not original:
        pool = deduped
        notes.append("no ORIGINAL/PRIMARY series, so derived series were considered")
        logger.warning("%s: no ORIGINAL/PRIMARY CT series; choosing among derived series", source)

    def rank(item: tuple[str, list[DicomHeader]]):
        uid, hs = item
        num = hs[0].series_number
        return (-len(hs), num if num is not None else 1 << 30, uid)

    ranked = sorted(pool.items(), key=rank)
    uid, chosen = ranked[0]
    others = [_describe(u, hs) for u, hs in ranked[1:]] + [
        _describe(u, hs) + " [not ORIGINAL/PRIMARY]" for u, hs in deduped.items() if u not in pool
    ]
    note = f"chose {_describe(uid, chosen)}: the most slices among {len(pool)} candidate CT series"
    if others:
        note += "; other series: " + ", ".join(others)
    if excluded:
        note += "; excluded files: " + ", ".join(f"{n} {r}" for r, n in excluded.most_common())
    if copies:
        note += f"; dropped {len(copies)} byte-identical duplicate file(s): {', '.join(sorted(copies)[:5])}"
        logger.warning("%s: dropped byte-identical duplicate DICOM files %s", source, sorted(copies))
    if notes:
        note += "; " + "; ".join(notes)
    if any(h.modality is None for h in chosen):
        note += "; Modality tag missing, accepted as CT"
        logger.warning("%s: chosen series has no Modality tag; accepting it as CT", source)
    logger.info("%s: %s", source, note)
    return chosen, note


def _majority(values: Sequence) -> object:
    return Counter(values).most_common(1)[0][0]


def check_series_geometry(headers: Sequence[DicomHeader], source: str | os.PathLike) -> SeriesGeometry:
    """Check one series' slices agree, order them along the slice normal and build the affine.

    Raises:
        InconsistentSeriesError: mixed image sizes, orientations or pixel spacings (names the odd file).
        SlicePositionError: missing position/orientation, duplicate positions, missing slices or a
            non-uniform step (see :func:`ctcovid.io.slice_geometry.check_slice_distances`).
    """
    hs = list(headers)
    size = _majority([(h.rows, h.columns) for h in hs])
    for h in hs:
        if (h.rows, h.columns) != size:
            raise InconsistentSeriesError(
                source,
                f"mixed image sizes: {h.name} is {h.rows}x{h.columns} (rows x columns) but the series is {size[0]}x{size[1]}",
            )
    for h in hs:
        if h.position is None or h.orientation is None:
            raise SlicePositionError(
                source,
                f"{h.name} has no usable ImagePositionPatient/ImageOrientationPatient; slices cannot be ordered",
            )
    ref_iop = np.asarray(_majority([h.orientation for h in hs]), dtype=np.float64)
    for h in hs:
        if np.max(np.abs(np.asarray(h.orientation) - ref_iop)) > 1e-3:
            raise InconsistentSeriesError(
                source,
                f"mixed orientations: {h.name} has ImageOrientationPatient {list(h.orientation)}, the series {ref_iop.tolist()}",
            )
    spacings = [h.pixel_spacing for h in hs if h.pixel_spacing is not None]
    spacing_known = len(spacings) == len(hs)
    if spacing_known:
        ref_ps = np.asarray(_majority(spacings), dtype=np.float64)
        for h in hs:
            if np.max(np.abs(np.asarray(h.pixel_spacing) - ref_ps) / ref_ps) > 1e-3:
                raise InconsistentSeriesError(
                    source,
                    f"mixed pixel spacings: {h.name} has {list(h.pixel_spacing)} mm, the series {ref_ps.tolist()} mm",
                )
    else:
        ref_ps = np.ones(2)
        logger.warning("%s: PixelSpacing missing in some slices; in-plane spacing set to 1 mm", source)

    try:
        normal = slice_normal(ref_iop)
    except ValueError as e:
        raise SlicePositionError(source, str(e)) from e
    order, dist = order_slices([h.position for h in hs], normal)
    ordered = [hs[i] for i in order]
    step = check_slice_distances(dist, labels=[h.name for h in ordered], source=source)

    first = np.asarray(ordered[0].position)
    if len(ordered) > 1:
        slice_vec = (np.asarray(ordered[-1].position) - first) / (len(ordered) - 1)
        in_plane = slice_vec - normal * float(slice_vec @ normal)
        if np.linalg.norm(in_plane) > 0.01 * np.linalg.norm(slice_vec):
            logger.warning(
                "%s: slice origins drift %.3f mm in-plane per slice (gantry tilt?); the affine carries the shear",
                source,
                float(np.linalg.norm(in_plane)),
            )
    else:
        thickness = ordered[0].slice_thickness
        spacing_known = spacing_known and thickness is not None and thickness > 0
        slice_vec = normal * (thickness if thickness and thickness > 0 else 1.0)
    affine = dicom_affine_ras(first, ref_iop, ref_ps, slice_vec)
    return SeriesGeometry(headers=tuple(ordered), affine=affine, step=step, spacing_known=spacing_known)


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
    slope = _float(ds.get("RescaleSlope", 1.0))
    intercept = _float(ds.get("RescaleIntercept", 0.0))
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


def _decode_sitk(headers: Sequence[DicomHeader]) -> np.ndarray:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([h.path for h in headers])  # our order, not GDCM's
    reader.SetOutputPixelType(sitk.sitkFloat32)  # each file's slope/intercept applied before the cast
    reader.MetaDataDictionaryArrayUpdateOff()
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM's spacing warnings: our own checks cover them
    try:
        arr = sitk.GetArrayFromImage(reader.Execute())
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    expected = (len(headers), headers[0].rows, headers[0].columns)
    if arr.shape != expected:
        raise RuntimeError(f"SimpleITK returned shape {arr.shape}, expected {expected}")
    return arr


def decode_series(headers: Sequence[DicomHeader], backend: Backend = "auto") -> tuple[np.ndarray, str]:
    """Decode ordered slices to a float32 (X, Y, Z) array in rescaled units (HU for CT).

    Args:
        headers: the slices in array order (from :func:`check_series_geometry`).
        backend: ``"sitk"`` (SimpleITK/GDCM, fastest), ``"pydicom"`` or ``"auto"`` (sitk when GDCM
            handles every transfer syntax).

    Returns:
        ``(array, backend used)``; ``array[i, j, k]`` is column i, row j of slice k.

    Raises:
        UnsupportedTransferSyntaxError, CorruptFileError (truncated/corrupt pixel data, names the file).
    """
    backend = check_transfer_syntaxes(headers, backend)
    if backend == "sitk":
        try:
            zyx = _decode_sitk(headers)
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
    else:
        zyx = _decode_pydicom(headers)
    return zyx.transpose(2, 1, 0), backend
