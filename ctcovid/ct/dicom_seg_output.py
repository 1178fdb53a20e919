"""A CT result's masks as a DICOM SEG next to its other outputs (DICOM inputs only).

The SEG is an extra: its failure never fails the scan, whose NIfTI masks are already written; why it is
missing goes into the record's ``output_notes``. A series whose export dropped the UIDs a SEG must reference
gets one only when the run asks for it (``assign_dicom_uids``): then ``<scan>_dicom/``, a copy of the series
with UIDs assigned (:mod:`ctcovid.io.dicom_uids`), is written too and the SEG references that copy.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .result import CTResult

__all__ = ["save_dicom_seg"]


def save_dicom_seg(result: CTResult, out: Path, written: dict[str, Path]) -> None:
    """Write ``<scan>_seg.dcm`` (and, where UIDs are assigned, ``<scan>_dicom/``) into ``out``; each output
    goes into ``written`` as soon as it exists."""
    from ctcovid.io.ct import dicom_series_files
    from ctcovid.io.dicom_seg import write_dicom_seg
    from ctcovid.io.dicom_uids import copy_with_assigned_uids
    from ctcovid.io.errors import CTInputError, UnreferencableSeriesError

    t = time.perf_counter()
    path = out / f"{result.scan_id}_seg.dcm"
    try:
        masks = {"lung": result.in_input_order(result.lung_mask)[0]}
        if result.infection_mask is not None:
            masks["infection"] = result.in_input_order(result.infection_mask)[0]
        if result.tilt_drift_voxels:  # SEG frames lie on the acquired (tilted) slices, not the corrected grid
            from ctcovid.io.gantry_tilt import to_acquired_grid

            masks = {k: to_acquired_grid(m, result.tilt_drift_voxels) for k, m in masks.items()}
        files = dicom_series_files(result.path)
        try:
            written["dicom_seg"] = write_dicom_seg(masks, files, path)
        except UnreferencableSeriesError as e:
            if not result.assign_dicom_uids:
                raise
            copy = out / f"{result.scan_id}_dicom"
            files = copy_with_assigned_uids(files, copy)
            try:
                written["dicom_seg"] = write_dicom_seg(masks, files, path)
            except BaseException:
                shutil.rmtree(copy, ignore_errors=True)  # no copy without the SEG it was made for
                raise
            written["dicom_series"] = copy
            result.output_notes["dicom_seg"] = (
                f"written against {copy.name}/, a copy of the series with UIDs assigned ({e})"
            )
    except Exception as e:  # noqa: BLE001 -- recorded with its type; the scan's other outputs stand
        result.output_notes["dicom_seg"] = f"not written: {e if isinstance(e, CTInputError) else repr(e)}"
    finally:
        result.timings_s["dicom_seg"] = time.perf_counter() - t
