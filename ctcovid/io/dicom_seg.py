"""DICOM Segmentation (SEG) output: a scan's masks as segments of one SEG object that references its source
CT series, so results open in 3D Slicer, OHIF or a PACS next to the images they were computed on.

Built with highdicom (the SEG encoding, UIDs and the references to the source instances are its job); what
is ours is the mapping from the pipeline's ``(X, Y, Z)`` mask to DICOM frames: ``mask[:, :, k].T`` is the
``(Rows, Columns)`` frame of source file ``k`` (the reader's array is ``pixel_array.T`` per slice, slices in
the checked order, :mod:`ctcovid.io.dicom_decode`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ctcovid.io.atomic import atomic_write
from ctcovid.io.dicom_uids import missing_uid
from ctcovid.io.errors import CTInputError, UnreferencableSeriesError

__all__ = ["SEGMENT_CODES", "write_dicom_seg"]

#: Type 2 patient/study attributes the SEG copies from its sources: anonymised exports often drop them; a
#: missing one is supplied empty (Type 2 allows that) on the in-memory copy, never in the source files.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

#: Segment label -> (category, type) as SNOMED CT ``(value, meaning)`` pairs.
SEGMENT_CODES: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "lung": (("91723000", "Anatomical Structure"), ("39607008", "Lung")),
    "infection": (("49755003", "Morphologically Altered Structure"), ("52988006", "Lesion")),
}


def _coded(value_meaning: tuple[str, str]):
    import highdicom as hd

    value, meaning = value_meaning
    return hd.sr.CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


def _segment_description(number: int, label: str, version: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    category, kind = SEGMENT_CODES[label]
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=_coded(category),
        segmented_property_type=_coded(kind),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="ctcovid", version=version, family=codes.cid7162.ArtificialIntelligence
        ),
    )


def _read_referencable(files: Sequence[str | os.PathLike]) -> list:
    """The files' headers, each checked as it is read (a refused series stops at its first file): a SEG
    points at its images by their UIDs and shares their frame of reference, so a series whose export dropped
    them is refused, naming the file, rather than given a SEG no viewer can place."""
    import pydicom

    sources = []
    for f in files:
        ds = pydicom.dcmread(os.fspath(f), stop_before_pixels=True)
        what = missing_uid(ds)
        if what is not None:
            raise UnreferencableSeriesError(
                f,
                f"has {what} (an anonymised export?): a DICOM SEG must reference its source images by their UIDs "
                "and frame of reference, so none is written (--assign-dicom-uids writes one against a copy of the "
                "series with UIDs assigned); the NIfTI mask is complete",
            )
        sources.append(ds)
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    if len(set(uids)) != len(uids):
        raise CTInputError(files[0], "repeats SOPInstanceUIDs across the series: a DICOM SEG cannot reference it")
    return sources


def write_dicom_seg(
    masks: Mapping[str, np.ndarray],
    source_files: Sequence[str | os.PathLike],
    path: str | os.PathLike,
    series_description: str = "ctcovid segmentation",
) -> Path:
    """Write ``masks`` as one binary DICOM SEG (atomically) that references ``source_files``.

    Args:
        masks: segment label (a key of :data:`SEGMENT_CODES`) -> ``(X, Y, Z)`` 0/1 array on the grid of the
            source series; ``Z`` follows ``source_files``.
        source_files: the series' DICOM files, slice ``k`` of the masks first to last.
        path: the ``.dcm`` file to write.
        series_description: the SEG series' description.

    Raises:
        UnreferencableSeriesError: a source file lacks a UID the SEG must reference (names the file).
        CTInputError: a mask's shape does not match the source series (the message names the first file).
    """
    import highdicom as hd

    from ctcovid import __version__

    sources = _read_referencable(source_files)
    for ds in sources:
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    frames = []
    for label, mask in masks.items():
        if label not in SEGMENT_CODES:
            raise ValueError(f"unknown segment {label!r} (known: {sorted(SEGMENT_CODES)})")
        if mask.shape != (cols, rows, len(sources)):
            raise CTInputError(
                source_files[0],
                f"{label} mask {mask.shape} does not fit the series ({cols} columns, {rows} rows, {len(sources)} files)",
            )
        frames.append(np.transpose(np.asarray(mask) > 0, (2, 1, 0)))  # (Z, Rows, Columns)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.stack(frames, axis=-1),  # (frames, rows, columns, segments)
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment_description(i + 1, label, __version__) for i, label in enumerate(masks)],
        series_instance_uid=hd.UID(),
        series_number=9000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ctcovid",
        manufacturer_model_name="ctcovid CT pipeline",
        software_versions=__version__,
        device_serial_number="none",
        series_description=series_description,
    )
    return atomic_write(path, lambda tmp: seg.save_as(tmp))
