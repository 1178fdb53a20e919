"""Patient-level splits and datalists for the chest X-ray cascade bundles.

The committed datalists (``bundles/<name>/configs/datalist.json``) hold paths *relative to a data root*
(``../shared/data/cxr/kermany`` or ``../shared/data/cxr/ieee8023`` by default, any copy of those folders
works), the integer label and the patient key, so a split can be audited and reproduced:

- stage 1 (``cxr_pneumonia_type_classification``): Kermany ``labels.csv``, classes
  ``normal / bacterial / viral``, grouped by ``patient_hint`` (one patient may have bacterial *and* viral
  images: the whole patient goes to one split);
- stage 2 (``cxr_covid_viral_classification``): ieee8023 ``labels.csv``, frontal views (PA, AP, AP Supine)
  whose coarse class is ``viral``, classes ``COVID-19 / viral-other``, grouped by ``patientid``.

Splits are stratified by the patient's set of labels and never put one patient in two splits.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

from ctcovid.io.atomic import write_json_atomic
from ctcovid.training.data_root import default_data_root
from ctcovid.training.splits import balanced_subset, group_split

STAGE1_CLASSES = ("normal", "bacterial", "viral")
STAGE2_CLASSES = ("COVID-19", "viral-other")
FRONTAL_VIEWS = ("PA", "AP", "AP Supine")


def kermany_items(data_root: str | os.PathLike) -> list[dict]:
    """Stage-1 items from Kermany ``labels.csv``: ``image`` (relative), ``label`` (0-2), ``patient``."""
    rows = _read_csv(Path(data_root) / "labels.csv")
    return [
        {"image": r["path"], "label": STAGE1_CLASSES.index(r["label3"]), "patient": r["patient_hint"]}
        for r in rows
    ]


def ieee8023_viral_items(data_root: str | os.PathLike) -> list[dict]:
    """Stage-2 items: ieee8023 frontal, present, coarse class ``viral``; label 0 = COVID-19, 1 = other viral.

    ``lung_mask`` (relative) is kept where a manual V7 Labs mask exists (COVID images only).
    """
    rows = _read_csv(Path(data_root) / "labels.csv")
    items = []
    for r in rows:
        if r["coarse_class"] != "viral" or r["view"] not in FRONTAL_VIEWS or r["file_present"] != "True":
            continue
        it = {"image": r["filename"], "label": 0 if r["is_covid"] == "True" else 1, "patient": r["patientid"]}
        if r.get("lung_mask"):
            it["lung_mask"] = r["lung_mask"]
        items.append(it)
    return items


def make_datalist(
    items: Sequence[dict],
    fractions: dict[str, float],
    class_names: Sequence[str],
    description: str,
    seed: int = 0,
) -> dict:
    """Datalist dict (parts + class counts per part + how it was made) from ``items``."""
    parts = group_split(items, fractions, seed=seed)
    counts = {
        k: {
            "images": {c: sum(1 for it in v if it["label"] == i) for i, c in enumerate(class_names)},
            "patients": len({it["patient"] for it in v}),
        }
        for k, v in parts.items()
    }
    return {
        "description": description,
        "class_names": list(class_names),
        "split": {"unit": "patient", "seed": seed, "fractions": fractions, "stratified_by": "patient label set"},
        "counts": counts,
        **parts,
    }


def load_datalist(
    datalist_file: str | os.PathLike,
    split: str,
    data_root: str | os.PathLike,
    limit: int | None = None,
    seed: int = 0,
    lung_masks: bool = False,
    mask_root: str | os.PathLike | None = None,
) -> list[dict]:
    """Items of one part of a committed datalist with absolute paths under ``data_root``.

    Each item: ``image`` (absolute), ``label``, ``patient``, ``name`` (the relative path) and, with
    ``lung_masks``, ``lung_mask`` (absolute).

    Args:
        datalist_file: the bundle's ``datalist.json``.
        split: ``training``, ``validation``, ``calibration`` or ``test``.
        data_root: folder the relative ``image`` / ``lung_mask`` paths are relative to.
        limit: keep at most this many items, taken class-balanced (round-robin over classes after a
            ``seed`` shuffle) so that reduced CPU trainings still see every class.
        lung_masks: add ``lung_mask`` to every item (regional learning); raises ``FileNotFoundError`` naming
            the first image without one.
        mask_root: where the masks are: ``mask_root/<image path with .png suffix>`` (masks precomputed by the
            X-ray lung segmenter, e.g. with :func:`ctcovid.cxr.masks.predict_lung_masks`). Without
            it, the manual masks named in the datalist are used (ieee8023 COVID images only).
    """
    with open(datalist_file, encoding="utf-8") as f:
        dl = json.load(f)
    if not isinstance(dl.get(split), list):
        parts = [k for k, v in dl.items() if isinstance(v, list) and k != "class_names"]
        raise KeyError(f"{datalist_file}: no part {split!r} (parts: {parts})")
    items = [dict(it) for it in dl[split]]
    if limit is not None and limit < len(items):
        items = balanced_subset(items, int(limit), seed)
    root = Path(data_root)
    for it in items:
        rel = it["image"]
        it["name"] = rel  # the relative path names the image in reports
        it["image"] = str(root / rel)
        manual = it.pop("lung_mask", None)
        if not lung_masks:
            continue
        if mask_root is not None:
            it["lung_mask"] = str(Path(mask_root, rel).with_suffix(".png"))
        elif manual:
            it["lung_mask"] = str(root / manual)
        else:
            raise FileNotFoundError(
                f"{datalist_file}: {rel} has no manual lung mask; precompute masks with the X-ray lung segmenter "
                "and set mask_root"
            )
    return items


def image_datalist(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict]:
    """``[{"image", "name"}]`` for a folder (every X-ray file below it, sorted) or a list of files."""
    from ctcovid.io.xray import XRAY_EXTENSIONS

    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        root = Path(source)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(XRAY_EXTENSIONS))
        return [{"image": str(p), "name": p.relative_to(root).as_posix()} for p in files]
    files = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    return [{"image": str(p), "name": Path(p).name} for p in files]


def _read_csv(path: Path) -> list[dict]:
    from ctcovid.io.errors import CorruptFileError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: labels file not found (is data_root the dataset folder?)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise CorruptFileError(path, "labels file has no rows")
    return rows


def build_bundle_datalists(bundles_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict:
    """(Re)build both committed datalists; returns ``{bundle: counts}``. Deterministic (seed 0)."""
    data_dir = Path(data_dir) if data_dir else Path(default_data_root())
    out = {}
    s1 = make_datalist(
        kermany_items(data_dir / "cxr" / "kermany"),
        {"training": 0.7, "validation": 0.1, "calibration": 0.1, "test": 0.1},
        STAGE1_CLASSES,
        "Kermany paediatric CXR (normal/bacterial/viral), split by patient_hint; paths relative to data_root",
    )
    s2 = make_datalist(
        ieee8023_viral_items(data_dir / "cxr" / "ieee8023"),
        {"training": 0.6, "validation": 0.2, "test": 0.2},
        STAGE2_CLASSES,
        "ieee8023 frontal viral CXR (COVID-19 vs other viral), split by patientid; paths relative to data_root",
    )
    for name, dl in (("cxr_pneumonia_type_classification", s1), ("cxr_covid_viral_classification", s2)):
        write_json_atomic(dl, Path(bundles_dir) / name / "configs" / "datalist.json")
        out[name] = dl["counts"]
    return out

