"""Atomic writers for pipeline outputs (JSON records, NIfTI masks, CSV summaries, raw bytes).

Every writer writes a temporary file in the destination folder and then ``os.replace``-s it onto the final
name, so a run killed at any moment leaves either the previous complete file or the new complete file,
never a truncated one. That is what makes resuming by ``<scan>.json`` safe.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np


def _full_suffix(name: str) -> str:
    # keep ".nii.gz" whole: nibabel picks the format (and gzip) from the file name
    for multi in (".nii.gz", ".tar.gz"):
        if name.endswith(multi):
            return multi
    return Path(name).suffix


def _default_file_mode() -> int:
    # mkstemp creates 0600 files; give outputs the permissions a plain open() would (0666 less the umask)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The temporary file keeps ``path``'s suffix (``.nii.gz`` included) so that writers choosing the format
    by extension behave. On any error the temporary file is removed and the error propagates.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{dest.name}.", suffix=".tmp" + _full_suffix(dest.name), dir=dest.parent
    )
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, _write)


def write_json_atomic(obj: object, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented UTF-8 JSON (NaN is written as ``null``, numpy scalars as numbers)."""
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return write_bytes_atomic(text.encode("utf-8"), path)


def write_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``array`` (X, Y, Z) with the 4x4 RAS ``affine`` as NIfTI-1 (``.nii`` or ``.nii.gz``)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)  # scanner coordinates, like the input
    img.set_sform(img.affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(img, tmp))


def write_csv_atomic(rows: Iterable[Mapping], fieldnames: Sequence[str], path: str | os.PathLike) -> Path:
    """Write ``rows`` (dicts) under a header of ``fieldnames``; missing values are written empty."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="ignore", restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})

    return atomic_write(path, _write)


def _jsonable(obj: object) -> object:
    """Recursively turn numpy scalars/arrays, paths and non-finite floats into JSON-safe values."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


__all__ = [
    "OutputFolderError",
    "atomic_write",
    "check_output_folder",
    "write_bytes_atomic",
    "write_csv_atomic",
    "write_json_atomic",
    "write_nifti_atomic",
]


class OutputFolderError(OSError):
    """An output folder that cannot be created or written; the message names it and says why."""


def check_output_folder(path: str | os.PathLike) -> Path:
    """Check, before any work, that ``path`` can be created (if missing) and written, without creating it.

    Probes with a temporary file, removed at once, in ``path`` or, when it does not exist yet, in its nearest
    existing parent folder; nothing is left behind either way. Raises :class:`OutputFolderError` naming the
    folder: a file in the way, a parent that is not a folder, or no write permission / read-only file system.
    """
    out = Path(path)
    probe_dir = out
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if probe_dir == out and out.exists() and not out.is_dir():
        raise OutputFolderError(f"output folder {out}: a file of that name is in the way")
    if not probe_dir.is_dir():
        raise OutputFolderError(f"output folder {out} cannot be created: {probe_dir} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".ctcovid-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = "is not writable" if probe_dir == out else f"cannot be created in {probe_dir}"
        raise OutputFolderError(f"output folder {out} {what}: {e.strerror or e}") from None
    return out
