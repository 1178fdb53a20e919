"""DICOM CT series: which series of a folder to use and its checked slice order.

Steps (each explicit and ours; pixel decoding is :mod:`ctcovid.io.dicom_decode`):

1. :func:`~ctcovid.io.dicom_headers.read_header` reads every file's header (:mod:`ctcovid.io.dicom_headers`).
2. :func:`choose_series` groups by SeriesInstanceUID, drops localizers, non-CT modalities, colour and
   multi-frame images, prefers ORIGINAL/PRIMARY series and picks the one with the most slices
   (after dropping byte-identical copies of the same SOP instance). The choice and the reasons are
   logged and returned as a note.
3. :func:`check_series_geometry` checks constant size / orientation / pixel spacing, orders slices by
   IPP along the slice normal and checks the step (see :mod:`ctcovid.io.slice_geometry`).
4. :func:`~ctcovid.io.dicom_decode.decode_series` decodes each slice once, in that order, to float32 HU.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ctcovid.io.dicom_headers import DicomHeader
from ctcovid.io.errors import (
    InconsistentSeriesError,
    NoCTSeriesError,
    SlicePositionError,
    UnsupportedFormatError,
)
from ctcovid.io.slice_geometry import check_slice_distances, dicom_affine_ras, order_slices, slice_normal

__all__ = ["SeriesGeometry", "check_series_geometry", "choose_series"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesGeometry:
    """A checked, ordered series: ``headers`` in slice order (k = 0 .. N-1) and its RAS affine."""

    headers: tuple[DicomHeader, ...]
    affine: np.ndarray
    step: float | None
    spacing_known: bool
    notes: tuple[str, ...] = ()


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
    ordered, dist, dup_note = _drop_same_position_copies(ordered, np.asarray(dist))
    step = check_slice_distances(dist, labels=[h.name for h in ordered], source=source)

    first = np.asarray(ordered[0].position)
    if len(ordered) > 1:
        # a gantry tilt leaves an in-plane drift here: the affine carries it as shear, which the reader then
        # resamples away and reports (ctcovid.io.gantry_tilt)
        slice_vec = (np.asarray(ordered[-1].position) - first) / (len(ordered) - 1)
    else:
        thickness = ordered[0].slice_thickness
        spacing_known = spacing_known and thickness is not None and thickness > 0
        slice_vec = normal * (thickness if thickness and thickness > 0 else 1.0)
    affine = dicom_affine_ras(first, ref_iop, ref_ps, slice_vec)
    return SeriesGeometry(
        headers=tuple(ordered), affine=affine, step=step, spacing_known=spacing_known,
        notes=(dup_note,) if dup_note else (),
    )


def _pixel_bytes(h: DicomHeader) -> bytes:
    import pydicom

    ds = pydicom.dcmread(h.path, force=True)
    return bytes(ds.PixelData) if "PixelData" in ds else b""


def _drop_same_position_copies(
    ordered: list[DicomHeader], dist: np.ndarray, tol: float = 0.01
) -> tuple[list[DicomHeader], np.ndarray, str]:
    """Drop slices at the position of the slice before them whose pixel data is identical (an export that wrote a
    slice twice under two SOP instance UIDs). Slices at one position with different pixels stay: the position
    check then refuses the series, since which one is right cannot be known."""
    keep = np.ones(len(ordered), dtype=bool)
    dropped: list[str] = []
    for i in range(1, len(ordered)):
        j = i - 1
        while j > 0 and not keep[j]:
            j -= 1
        if abs(dist[i] - dist[j]) <= tol and _pixel_bytes(ordered[i]) == _pixel_bytes(ordered[j]):
            keep[i] = False
            dropped.append(f"{ordered[i].name} (= {ordered[j].name})")
    if not dropped:
        return ordered, dist, ""
    note = (
        f"dropped {len(dropped)} duplicate slice(s) at the same position with identical pixels: "
        + ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else "")
    )
    return [h for h, k in zip(ordered, keep) if k], dist[keep], note
