"""Turning command-line inputs into a list of scans.

An input is one scan or a folder of scans:

- a file (NIfTI ``.nii``/``.nii.gz``, ``.mha``/``.nrrd``, a single DICOM file, ...) is one scan;
- a folder holding DICOM files directly (by ``.dcm``/``.ima`` extension or the ``DICM`` preamble, so
  extension-less series count) is one DICOM series scan;
- a folder holding JPG/PNG/BMP/TIFF slices directly (the COV19-CT-DB layout) is one slice-folder scan;
- any other folder is a parent: each volume file in it and each sub-folder that is (or holds) a scan is a
  scan, searched recursively (``train/covid/ct_scan_0/`` works from ``train/``).

Where a folder holds both DICOM files and sub-folders, the DICOM files win (it is a series folder); where it
holds volume files (NIfTI, ...) and images, it is a parent of the volumes (a stray ``preview.png`` next to
NIfTI scans does not turn the folder into a slice folder). A folder given explicitly that holds nothing
recognisable is still passed on as a scan, so the reader reports *why* it is unusable (empty folder,
unknown files) as a failed scan instead of silently dropping it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ctcovid.io.errors import InputNotFoundError

SLICE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom", ".ima"})


@dataclass(frozen=True)
class ScanInput:
    """One scan to process: where it is on disk and the id its outputs are named by."""

    path: Path
    scan_id: str


def _visible(entries: Iterable[Path]) -> list[Path]:
    return sorted(e for e in entries if not e.name.startswith("."))


def is_volume_file(path: Path) -> bool:
    """A single-file volume format (NIfTI, MetaImage, NRRD)."""
    name = path.name.lower()
    return any(name.endswith(s) for s in VOLUME_SUFFIXES)


def is_dicom_file(path: Path) -> bool:
    """DICOM by extension or by the 128-byte preamble followed by ``DICM`` (``DICOMDIR`` excluded)."""
    if path.name.upper() == "DICOMDIR":
        return False
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def classify_folder(folder: Path) -> str:
    """``"dicom"``, ``"slices"`` or ``"parent"`` for a folder, from the files directly inside it."""
    files = [e for e in _visible(folder.iterdir()) if e.is_file()]
    if any(is_dicom_file(f) for f in files):
        return "dicom"
    if any(is_volume_file(f) for f in files):
        return "parent"
    if any(f.suffix.lower() in SLICE_EXTENSIONS for f in files):
        return "slices"
    return "parent"


def scan_name(path: Path) -> str:
    name = path.name
    for s in VOLUME_SUFFIXES + tuple(DICOM_EXTENSIONS):
        if name.lower().endswith(s):
            name = name[: -len(s)]
            break
    return _safe(name)  # output file names must be safe on every file system


def _collect(folder: Path, out: list[Path]) -> bool:
    """Append scans found below parent ``folder`` to ``out``; return whether any was found."""
    found = False
    for entry in _visible(folder.iterdir()):
        if entry.is_file() and is_volume_file(entry):
            out.append(entry)
            found = True
        elif entry.is_dir():
            if classify_folder(entry) != "parent":
                out.append(entry)
                found = True
            else:
                found = _collect(entry, out) or found
    return found


def discover_scans(inputs: Iterable[str | os.PathLike]) -> list[ScanInput]:
    """Expand ``inputs`` (files, scan folders, parent folders) into scans with unique ids.

    Raises :class:`~ctcovid.io.errors.InputNotFoundError` (a ``FileNotFoundError``) naming the first input
    that does not exist (a usage error, before any work starts). The same scan reached twice is processed once. Ids are the scan's file or folder name
    (``rp2.nii.gz`` -> ``rp2``); clashing names get their parent folders' names prepended until unique.
    """
    paths: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise InputNotFoundError(p, "input not found (no such file or folder)")
        p = Path(os.path.abspath(p))  # absolute, but a symlink keeps its own name (the scan id)
        if p.is_file() or classify_folder(p) != "parent":
            paths.append(p)
        elif not _collect(p, paths):
            paths.append(p)  # nothing recognisable inside: let the reader say why
    unique = list(dict.fromkeys(paths))
    return [ScanInput(p, i) for p, i in zip(unique, _unique_ids(unique))]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scan"


def _unique_ids(paths: list[Path]) -> list[str]:
    depth = [0] * len(paths)

    def make(i: int) -> str:
        parents = [_safe(a.name) for a in list(paths[i].parents)[: depth[i]]]
        return "__".join([*reversed(parents), scan_name(paths[i])])

    ids = [make(i) for i in range(len(paths))]
    while True:
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(ids):
            groups.setdefault(s.lower(), []).append(i)  # case-insensitive file systems
        clashes = [i for g in groups.values() if len(g) > 1 for i in g]
        growable = [i for i in clashes if depth[i] < len(paths[i].parents) - 1]
        if not growable:
            break
        for i in growable:
            depth[i] += 1
            ids[i] = make(i)
    # still equal (names differing only by characters made safe): number them
    counts: dict[str, int] = {}
    out = []
    for s in ids:
        n = counts.get(s.lower(), 0)
        counts[s.lower()] = n + 1
        out.append(s if n == 0 else f"{s}__{n}")
    return out


__all__ = ["ScanInput", "classify_folder", "discover_scans", "is_dicom_file", "is_volume_file"]
