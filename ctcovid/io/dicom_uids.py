"""The UIDs a DICOM SEG needs from its source series, and a copy of a series with the missing ones assigned.

A SEG references each source image by its SOPInstanceUID and shares the series' study and frame of reference.
Anonymised exports often drop or mangle them (COVID-CT-MD: no SOPInstanceUID, no FrameOfReferenceUID, UUID
strings as study and series UIDs), so no SEG can point at those files. :func:`copy_with_assigned_uids`
writes a copy of such a series whose missing or invalid UIDs are replaced by valid ones (pixels, geometry and
every other attribute untouched); a SEG that references the copy loads with it in 3D Slicer, OHIF or a PACS.

The assigned UIDs are ``2.25.<UUID>`` UIDs (ISO/IEC 9834-8) whose UUIDs are name-based (version 5) on the
files' contents, so a re-run assigns the same ones (a SEG written again still matches the copy written before).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

__all__ = ["REFERENCED_UIDS", "copy_with_assigned_uids", "missing_uid"]

#: Per-file UIDs a SEG needs from each source image, in the order they are checked.
REFERENCED_UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")


def _uid_value(ds, keyword: str) -> tuple[str, bool]:
    """(``ds``'s value of ``keyword`` as text, whether it is a valid UID)."""
    from pydicom.uid import UID

    value = str(ds.get(keyword, "") or "")
    return value, bool(value) and UID(value).is_valid


def missing_uid(ds) -> str | None:
    """What keeps a SEG from referencing dataset ``ds`` (e.g. ``"no SOPInstanceUID"``), or ``None``."""
    for keyword in REFERENCED_UIDS:
        value, valid = _uid_value(ds, keyword)
        if not valid:
            return f"an invalid {keyword} {value!r}" if value else f"no {keyword}"
    return None


def _uid(*parts: str) -> str:
    # pydicom's generate_uid(prefix=None) is random whatever its entropy sources: name-based UUID here instead
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '|'.join(parts)).int}"


def copy_with_assigned_uids(files: Sequence[str | os.PathLike], folder: str | os.PathLike) -> list[Path]:
    """Write ``files`` (one series, in slice order) into ``folder`` with valid UIDs where theirs are missing.

    Valid UIDs are kept. A missing or invalid SOPInstanceUID gets one from the file's bytes; a missing or
    invalid series, study or frame-of-reference UID gets one per series, the same for every file. The file
    meta information follows the new SOPInstanceUID. The folder appears complete or not at all (written
    beside it, then renamed; an older copy is replaced).

    Returns:
        The copies' paths, in the order of ``files``.
    """
    import pydicom

    dest = Path(folder)
    digests = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files]
    series_key = hashlib.sha256("".join(digests).encode()).hexdigest()
    shared: dict[str, str] = {}
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        out = []
        for f, digest in zip(files, digests):
            ds = pydicom.dcmread(os.fspath(f))
            for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
                value, valid = _uid_value(ds, keyword)
                if not valid:
                    # one per series: the first file's (invalid) value and the series' content decide it
                    shared.setdefault(keyword, _uid(keyword, value, series_key))
                    setattr(ds, keyword, shared[keyword])
            sop, valid = _uid_value(ds, "SOPInstanceUID")
            if not valid:
                ds.SOPInstanceUID = _uid("SOPInstanceUID", sop, digest)
            if getattr(ds, "file_meta", None) is not None:
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            target = tmp / Path(f).name
            ds.save_as(target)
            out.append(dest / target.name)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
