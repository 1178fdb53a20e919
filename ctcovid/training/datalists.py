"""Datalists for the CT classification bundles: lists of ``{"image", "label", "name", "lung_mask"?}`` dicts.

Three sources:

- :func:`find_scans` -- every scan under a folder (inference): each NIfTI file, each DICOM series folder
  and each JPG/PNG slice folder is one scan.
- :func:`cov19ctdb_datalist` / :func:`severity_csv_datalist` -- the COV19-CT-DB challenge layouts:
  ``<root>/<split>/{covid,non-covid}/<scan folder>/*.jpg`` for detection and the severity CSV
  (columns ``Name``, ``Category`` with Category 1..4 = mild..critical) for severity.
- :func:`load_datalist` -- a plain CSV or JSON datalist (keys ``image``, ``label``, optional ``lung_mask``).

Paths in the returned dicts are absolute strings; nothing is read from the scans themselves (the
readers in :mod:`ctcovid.io` do that and raise their own errors for bad files).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ctcovid.io.errors import CTInputError, EmptyInputError

__all__ = [
    "DETECTION_CLASSES",
    "DatalistError",
    "find_scans",
    "scan_kind",
    "cov19ctdb_datalist",
    "severity_csv_datalist",
    "load_datalist",
]

logger = logging.getLogger(__name__)

#: Class order of the detection bundle (index 1 = COVID-19), as the COV19-CT-DB folder names spell them.
DETECTION_CLASSES = ("non-covid", "covid")

SLICE_SUFFIXES = (".jpg", ".jpeg", ".png")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIXES = (".dcm", ".dicom")
_NOT_DICOM_SUFFIXES = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".png",
        ".gz",
        ".nii",
        ".txt",
        ".csv",
        ".json",
        ".xml",
        ".md",
        ".pdf",
        ".zip",
        ".npy",
        ".npz",
    }
)


class DatalistError(CTInputError):
    """A datalist or dataset folder layout cannot be used (missing column, unknown label, missing scan)."""


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_dicom_file(path: Path) -> bool:
    """DICOM by suffix, or by the ``DICM`` magic at byte 128 (series are often stored without suffix)."""
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in _NOT_DICOM_SUFFIXES:
        return False
    # no or unknown suffix: DICOM series are often stored as bare UIDs ("CT.1.2.840....")
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _strip_nifti_suffix(name: str) -> str:
    low = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def scan_kind(path: str | os.PathLike) -> str | None:
    """``"nifti"``, ``"dicom"`` (a folder with DICOM files), ``"slices"`` (a folder with JPG/PNG files) or None.

    A folder counts by the files directly inside it; the first few regular files decide.
    """
    p = Path(path)
    if p.is_file():
        return "nifti" if _is_nifti(p) else None
    if not p.is_dir():
        return None
    files = sorted(e for e in p.iterdir() if e.is_file() and not _is_hidden(e.name))
    if any(f.suffix.lower() in SLICE_SUFFIXES for f in files):
        return "slices"
    # a DICOM series folder: check a handful of files, not all of them (series have hundreds)
    if any(_is_dicom_file(f) for f in files[:8]) or any(f.suffix.lower() in DICOM_SUFFIXES for f in files):
        return "dicom"
    return None


def _scan_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if path != root else Path(path.name)
    return _strip_nifti_suffix(rel.as_posix())


def find_scans(dataset_dir: str | os.PathLike) -> list[dict]:
    """Every scan under ``dataset_dir``, sorted by path: ``[{"image": path, "name": relative name}, ...]``.

    Each NIfTI file is one scan; each folder that directly holds DICOM files or JPG/PNG slices is one
    scan (its sub-folders are not searched further). ``dataset_dir`` may also be a single scan (a NIfTI
    file or a scan folder). Hidden files and folders are ignored.

    Raises:
        EmptyInputError: ``dataset_dir`` does not exist or holds no scan.
    """
    root = Path(dataset_dir).expanduser().resolve()
    if not root.exists():
        raise EmptyInputError(root, "dataset folder does not exist")
    if scan_kind(root) is not None:  # the path is itself one scan
        return [{"image": str(root), "name": _scan_name(root, root.parent)}]
    scans: list[dict] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        here = Path(dirpath)
        for fname in sorted(filenames):
            if not _is_hidden(fname) and _is_nifti(here / fname):
                scans.append({"image": str(here / fname), "name": _scan_name(here / fname, root)})
        keep = []
        for d in dirnames:
            if scan_kind(here / d) is not None:
                scans.append({"image": str(here / d), "name": _scan_name(here / d, root)})
            else:
                keep.append(d)
        dirnames[:] = keep  # do not descend into scan folders
    if not scans:
        raise EmptyInputError(
            root, "no scans found (expected NIfTI files, DICOM series folders or JPG/PNG slice folders)"
        )
    return sorted(scans, key=lambda s: s["name"])


def _norm_class(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def cov19ctdb_datalist(
    dataset_dir: str | os.PathLike, split: str = "train", class_names: Sequence[str] = DETECTION_CLASSES
) -> list[dict]:
    """Scans of the COV19-CT-DB detection layout ``<dataset_dir>/<split>/<class>/<scan folder>/``.

    Class folders match ``class_names`` case-insensitively, ``_`` and ``-`` alike (``non-covid`` =
    ``Non_COVID``); the label is the index in ``class_names``. Each sub-folder of a class folder is one
    scan (a folder of JPG/PNG slices in the challenge data; DICOM series folders and NIfTI files work too).

    Returns ``[{"image", "label", "name"}]`` with ``name = "<split>/<class folder>/<scan>"``, sorted.

    Raises:
        DatalistError: the split folder is missing or holds none of the class folders.
    """
    split_dir = Path(dataset_dir).expanduser().resolve() / split
    if not split_dir.is_dir():
        raise DatalistError(split_dir, f"COV19-CT-DB split folder {split!r} not found")
    folders = {_norm_class(d.name): d for d in split_dir.iterdir() if d.is_dir() and not _is_hidden(d.name)}
    items: list[dict] = []
    found = 0
    for label, cname in enumerate(class_names):
        cdir = folders.get(_norm_class(cname))
        if cdir is None:
            logger.warning("%s: no folder for class %r", split_dir, cname)
            continue
        found += 1
        for scan in sorted(cdir.iterdir()):
            if _is_hidden(scan.name) or not (scan.is_dir() or _is_nifti(scan)):
                continue
            items.append(
                {
                    "image": str(scan),
                    "label": label,
                    "name": f"{split}/{cdir.name}/{_strip_nifti_suffix(scan.name)}",
                }
            )
    if found == 0:
        raise DatalistError(split_dir, f"none of the class folders {list(class_names)} found")
    if not items:
        raise DatalistError(split_dir, "the class folders hold no scans")
    return items


def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file with a header; the delimiter (``,`` ``;`` or tab) is detected."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DatalistError(path, f"cannot read datalist: {e}") from e
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DatalistError(path, "empty CSV file")
    header = lines[0]
    delimiter = max((",", ";", "\t"), key=header.count)
    reader = csv.DictReader(lines, delimiter=delimiter)
    rows = []
    for row in reader:
        rows.append({(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None})
    return rows


def _column(row: dict[str, str], name: str) -> str | None:
    """Case-insensitive column lookup."""
    for k, v in row.items():
        if k.lower() == name.lower():
            return v
    return None


def severity_csv_datalist(
    csv_path: str | os.PathLike,
    scans_dir: str | os.PathLike,
    num_classes: int = 4,
    first_category: int = 1,
) -> list[dict]:
    """Scans listed in a COV19-CT-DB severity CSV (``Name``, ``Category``; Category 1..4 = mild..critical).

    Args:
        csv_path: the CSV (``,`` ``;`` or tab separated, header row required).
        scans_dir: folder holding the scan folders, directly or in sub-folders (e.g. ``train/`` or
            ``train/covid/``); ``Name`` is the scan folder's name.
        num_classes: number of severity classes.
        first_category: the ``Category`` value of class 0 (1 in the challenge files).

    Returns ``[{"image", "label", "name"}]`` in CSV order; ``label = Category - first_category``.

    Raises:
        DatalistError: missing columns, a category out of range, or a listed scan not found.
    """
    csv_path = Path(csv_path).expanduser().resolve()
    root = Path(scans_dir).expanduser().resolve()
    if not root.is_dir():
        raise DatalistError(root, "scan folder of the severity CSV not found")
    index: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        for d in dirnames:
            index.setdefault(d, []).append(Path(dirpath) / d)
        for fname in filenames:
            if _is_nifti(Path(fname)):
                index.setdefault(_strip_nifti_suffix(fname), []).append(Path(dirpath) / fname)
    items = []
    for i, row in enumerate(_read_csv_rows(csv_path), start=2):  # line 1 is the header
        name, category = _column(row, "Name"), _column(row, "Category")
        if name is None or category is None:
            raise DatalistError(csv_path, f"columns 'Name' and 'Category' required, found {sorted(row)}")
        try:
            label = int(float(category)) - first_category
        except ValueError:
            raise DatalistError(csv_path, f"line {i}: Category {category!r} is not a number") from None
        if not 0 <= label < num_classes:
            raise DatalistError(
                csv_path,
                f"line {i}: Category {category} outside {first_category}..{first_category + num_classes - 1}",
            )
        matches = index.get(name, [])
        if not matches:
            raise DatalistError(csv_path, f"line {i}: scan {name!r} not found under {root}")
        if len(matches) > 1:
            raise DatalistError(
                csv_path, f"line {i}: scan name {name!r} is ambiguous: {[str(m) for m in matches]}"
            )
        items.append({"image": str(matches[0]), "label": label, "name": name})
    if not items:
        raise DatalistError(csv_path, "the severity CSV lists no scans")
    return items


def _parse_label(value, class_names: Sequence[str] | None, where: Path, row: int) -> int:
    if isinstance(value, bool):
        raise DatalistError(where, f"entry {row}: label {value!r} is not a class")
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        label = int(value)
        if label != float(value):
            raise DatalistError(where, f"entry {row}: label {value!r} is not an integer")
    elif isinstance(value, str) and class_names is not None:
        norm = {_norm_class(c): j for j, c in enumerate(class_names)}
        if _norm_class(value) not in norm:
            raise DatalistError(where, f"entry {row}: label {value!r} is not one of {list(class_names)}")
        label = norm[_norm_class(value)]
    else:
        raise DatalistError(where, f"entry {row}: label {value!r} is not a class index")
    if class_names is not None and not 0 <= label < len(class_names):
        raise DatalistError(where, f"entry {row}: label {label} outside 0..{len(class_names) - 1}")
    return label


def load_datalist(
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    base_dir: str | os.PathLike | None = None,
    key: str | None = None,
    require_label: bool = False,
) -> list[dict]:
    """Read a CSV or JSON datalist of scans.

    Args:
        path: ``.csv`` (header row with at least ``image``; optional ``label``, ``lung_mask``, ``name`` and
            any other columns, kept as strings) or ``.json`` (a list of such dicts, or a dict of lists with
            ``key`` choosing one, e.g. ``"training"`` in the MONAI decathlon style).
        class_names: if given, labels may be class names (case-insensitive) and indices are range-checked.
        base_dir: folder that relative ``image`` / ``lung_mask`` paths start from; default the datalist's folder.
        key: the list to use when the JSON file is a dict.
        require_label: raise if an entry has no label (training and evaluation).

    Returns ``[{"image", "name", "label"?, "lung_mask"?, ...}]``; ``name`` defaults to the image file or
    folder name without NIfTI suffix. Empty ``lung_mask`` cells are dropped.

    Raises:
        DatalistError: unreadable file, missing ``image``/``label``, unknown label, or a listed path that
        does not exist.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise DatalistError(p, "datalist file not found")
    base = Path(base_dir).expanduser().resolve() if base_dir is not None else p.parent
    if p.suffix.lower() == ".json":
        try:
            content = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DatalistError(p, f"cannot read JSON datalist: {e}") from e
        if isinstance(content, dict):
            if key is None or key not in content:
                raise DatalistError(
                    p, f"JSON datalist is a dict: choose the list with key=, one of {sorted(content)}"
                )
            content = content[key]
        if not isinstance(content, list) or not all(isinstance(e, dict) for e in content):
            raise DatalistError(p, "JSON datalist must be a list of objects")
        rows = content
    elif p.suffix.lower() in (".csv", ".tsv", ".txt"):
        rows = _read_csv_rows(p)
    else:
        raise DatalistError(p, "datalist must be a .csv or .json file")
    items = []
    for i, row in enumerate(rows, start=1):
        item = {k: v for k, v in row.items() if not (k == "lung_mask" and v in ("", None))}
        if not item.get("image"):
            raise DatalistError(p, f"entry {i}: no 'image'")
        for k in ("image", "lung_mask"):
            if k in item:
                fp = Path(str(item[k])).expanduser()
                fp = fp if fp.is_absolute() else base / fp
                if not fp.exists():
                    raise DatalistError(p, f"entry {i}: {k} {str(fp)!r} does not exist")
                item[k] = os.path.abspath(fp)  # absolute, symlinks kept (the name comes from the listed path)
        if item.get("label") not in (None, ""):
            item["label"] = _parse_label(item["label"], class_names, p, i)
        elif require_label:
            raise DatalistError(p, f"entry {i}: no 'label'")
        else:
            item.pop("label", None)
        if not item.get("name"):
            item["name"] = _strip_nifti_suffix(Path(item["image"]).name)
        items.append(item)
    if not items:
        raise DatalistError(p, "the datalist lists no scans")
    return items
