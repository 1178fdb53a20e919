"""Class mappings and patient-level datalists for the ResNet-18, DETL and V-BreathNet chest X-ray bundles.

All three bundles draw on ``<data>/cxr`` (``kermany/`` and ``ieee8023/``); datalist paths are relative to
that folder (``kermany/train/NORMAL/...``, ``ieee8023/images/...``) so one ``data_root`` serves both sources.
Patients are keyed ``kermany:<patient_hint>`` / ``ieee8023:<patientid>``; every split and fold is made with
:func:`ctcovid.training.splits.group_split`, which never puts one patient in two parts.

Label mappings (from ``kermany/labels.csv`` column ``label3`` and ``ieee8023/labels.csv`` columns
``finding`` / ``coarse_class``; ieee8023 rows with finding ``todo`` (unlabelled) are never used):

- ResNet-18 (:data:`RESNET18_CLASSES`): ``non-COVID-19`` = Kermany normal + every other labelled ieee8023 film
  ("No Finding" and the other findings: the adults without COVID-19); ``COVID-19`` = ieee8023 findings starting
  with "COVID-19" (COVID-19, "COVID-19, ARDS"). The paper's negative class is "normal" only; with this data that
  task is solved by telling adults from children (measured: adult-only AUC 0.54), so the adult non-COVID films
  join the negatives and items carry ``domain`` (``child`` / ``adult``) for a sampler that balances both.
- DETL stage B (:data:`ctcovid.networks.DETL_TARGET_CLASSES`): ``normal`` as above; ``pneumonia`` = Kermany
  bacterial + viral; ``COVID-19`` as above; ``other disease`` = every other labelled ieee8023 finding
  (SARS, Varicella, Influenza, Streptococcus, Klebsiella, Legionella, Mycoplasma, Pneumocystis, Lipoid, ARDS,
  unspecified Pneumonia). DETL stage A (source task, :data:`DETL_SOURCE_CLASSES`): ``normal`` vs ``disease``
  on a patient half of Kermany (the ``source`` pool) that stage B never sees.
- V-BreathNet (:data:`ctcovid.networks.VBREATHNET_CLASSES`): ``COVID-19`` as above; ``normal`` as above;
  ``pneumonia`` = Kermany bacterial + viral + the ieee8023 non-COVID pneumonias (bacterial, fungal and viral
  coarse classes, Lipoid and unspecified Pneumonia; ARDS alone is left out).

Caveat (documented in every bundle): the classes are confounded with the source dataset (Kermany images are
paediatric and 224x224 JPEG; ieee8023 images are adult, of mixed origin). A model may partly learn the
source; the numbers are a demonstration that training works, not a clinical result.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from ctcovid.io.atomic import write_json_atomic
from ctcovid.networks.detl import DETL_TARGET_CLASSES
from ctcovid.networks.vbreathnet import VBREATHNET_CLASSES
from ctcovid.training.splits import fold_parts, group_split, load_parts, patient_kfold

__all__ = [
    "RESNET18_CLASSES",
    "DETL_SOURCE_CLASSES",
    "cxr_records",
    "resnet18_items",
    "detl_items",
    "vbreathnet_items",
    "patient_kfold",
    "load_parts",
    "build_resnet18_datalist",
    "build_detl_datalist",
    "build_vbreathnet_datalist",
    "count_classes",
    "adult_probe_items",
    "fold_parts",
    "write_datalist",
]

RESNET18_CLASSES = ("non-COVID-19", "COVID-19")
DETL_SOURCE_CLASSES = ("normal", "disease")
FRONTAL_VIEWS = ("PA", "AP", "AP Supine")


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: labels file not found (is data_root the shared 'cxr' folder?)")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def cxr_records(cxr_root: str | os.PathLike) -> list[dict]:
    """Every usable image of both sources: ``image`` (relative to ``cxr_root``), ``patient``, ``source``,
    ``group`` (``normal`` / ``pneumonia`` / ``covid`` / ``other``) and ``finding`` (the raw label).

    ``group`` is the coarse meaning the three mappings are built from: Kermany normal -> normal, Kermany
    bacterial / viral -> pneumonia; ieee8023 "No Finding" -> normal, COVID-19* -> covid, any other labelled
    finding -> other. ieee8023 rows must be present, frontal X-rays; ``todo`` rows are skipped.
    """
    root = Path(cxr_root)
    out = []
    for r in _read_csv(root / "kermany" / "labels.csv"):
        out.append(
            {
                "image": f"kermany/{r['path']}",
                "patient": f"kermany:{r['patient_hint']}",
                "source": "kermany",
                "group": "normal" if r["label3"] == "normal" else "pneumonia",
                "finding": r["label3"],
            }
        )
    for r in _read_csv(root / "ieee8023" / "labels.csv"):
        if r.get("file_present", "True") != "True" or r.get("view") not in FRONTAL_VIEWS:
            continue
        finding = r["finding"]
        if finding == "todo" or r.get("coarse_class") == "unlabeled":
            continue
        if finding == "No Finding":
            group = "normal"
        elif finding.startswith("COVID-19"):
            group = "covid"
        else:
            group = "other"
        out.append(
            {
                "image": f"ieee8023/{r['filename']}",
                "patient": f"ieee8023:{r['patientid']}",
                "source": "ieee8023",
                "group": group,
                "finding": finding,
                "coarse_class": r.get("coarse_class", ""),
            }
        )
    return out


def _labelled(records: Sequence[dict], mapping: dict[tuple[str, str], int | Callable[[dict], int | None]]) -> list[dict]:
    """Items of the records whose (source, group) the mapping labels (a class index, or a function of the
    record returning one or ``None`` to leave it out); other records are left out."""
    items = []
    for r in records:
        lab = mapping.get((r["source"], r["group"]))
        if callable(lab):
            lab = lab(r)
        if lab is None:
            continue
        items.append({"image": r["image"], "label": int(lab), "patient": r["patient"], "finding": r["finding"]})
    return items


def resnet18_items(cxr_root: str | os.PathLike) -> list[dict]:
    """ResNet-18 items: label 0 = non-COVID-19, 1 = COVID-19, ``domain`` child (Kermany) or adult (ieee8023)."""
    items = _labelled(
        cxr_records(cxr_root),
        {("kermany", "normal"): 0, ("ieee8023", "normal"): 0, ("ieee8023", "other"): 0, ("ieee8023", "covid"): 1},
    )
    return [{**it, "domain": "adult" if it["patient"].startswith("ieee8023:") else "child"} for it in items]


def adult_probe_items(cxr_root: str | os.PathLike, datalist: dict, covid_class: int) -> list[dict]:
    """Adult (ieee8023) films a network trained on ``datalist`` never saw, for measuring it without the
    children-vs-adults confound: the ``test`` part's ieee8023 images, plus every labelled ieee8023 film whose
    patient is in no ``training`` / ``validation`` part and that the datalist does not list (findings its classes
    leave out, e.g. other pneumonias for a COVID-19-vs-normal task).

    Items carry ``image`` (relative to ``cxr_root``, like the datalist's), ``patient``, ``finding``, ``group``
    (``covid`` / ``normal`` / ``other``) and ``covid`` (bool, from the datalist label ``covid_class`` for listed
    images, from the finding for the others).
    """
    seen = {it["patient"] for part in ("training", "validation") for it in datalist.get(part, [])}
    listed = {it["image"] for part in ("training", "validation", "test") for it in datalist.get(part, [])}
    adults = [r for r in cxr_records(cxr_root) if r["source"] == "ieee8023"]
    groups = {r["image"]: r["group"] for r in adults}
    out = [
        {"image": it["image"], "patient": it["patient"], "finding": it.get("finding", ""),
         "group": groups.get(it["image"], "covid" if it["label"] == covid_class else "other"),
         "covid": it["label"] == covid_class}
        for it in datalist["test"]
        if it["image"].startswith("ieee8023/")
    ]
    for r in adults:
        if r["patient"] not in seen and r["image"] not in listed:
            out.append({"image": r["image"], "patient": r["patient"], "finding": r["finding"], "group": r["group"],
                        "covid": r["group"] == "covid"})
    return out


def detl_items(cxr_root: str | os.PathLike) -> list[dict]:
    """DETL stage-B items, labels in :data:`~ctcovid.networks.DETL_TARGET_CLASSES` order
    (0 normal, 1 other disease, 2 pneumonia, 3 COVID-19). Kermany items are also returned for stage A."""
    idx = {c: i for i, c in enumerate(DETL_TARGET_CLASSES)}
    return _labelled(
        cxr_records(cxr_root),
        {
            ("kermany", "normal"): idx["normal"],
            ("kermany", "pneumonia"): idx["pneumonia"],
            ("ieee8023", "normal"): idx["normal"],
            ("ieee8023", "covid"): idx["COVID-19"],
            ("ieee8023", "other"): idx["other disease"],
        },
    )


def _ieee_pneumonia(r: dict) -> int | None:
    # ARDS alone is a syndrome, not a pneumonia; everything else labelled non-COVID in ieee8023 is one.
    return None if r["finding"] == "ARDS" else VBREATHNET_CLASSES.index("pneumonia")


def vbreathnet_items(cxr_root: str | os.PathLike) -> list[dict]:
    """V-BreathNet items, labels in :data:`~ctcovid.networks.VBREATHNET_CLASSES` order
    (0 COVID-19, 1 normal, 2 pneumonia)."""
    c = VBREATHNET_CLASSES.index
    return _labelled(
        cxr_records(cxr_root),
        {
            ("ieee8023", "covid"): c("COVID-19"),
            ("kermany", "normal"): c("normal"),
            ("ieee8023", "normal"): c("normal"),
            ("kermany", "pneumonia"): c("pneumonia"),
            ("ieee8023", "other"): _ieee_pneumonia,
        },
    )


def count_classes(items: Sequence[dict], class_names: Sequence[str]) -> dict:
    """``{"images": {class: n}, "patients": n}`` of a list of items."""
    counts = Counter(int(it["label"]) for it in items)
    return {
        "images": {c: counts.get(i, 0) for i, c in enumerate(class_names)},
        "patients": len({it["patient"] for it in items}),
    }


def _datalist(description: str, class_names: Sequence[str], parts: dict[str, list[dict]], **extra) -> dict:
    return {
        "description": description,
        "class_names": list(class_names),
        "paths_relative_to": "the shared cxr folder ($CTCOVID_DATA/cxr or ../shared/data/cxr)",
        **extra,
        "counts": {k: count_classes(v, class_names) for k, v in parts.items()},
        **parts,
    }


def build_resnet18_datalist(cxr_root: str | os.PathLike, seed: int = 0) -> dict:
    """Patient-level split for the ResNet-18 bundle: Kermany children 70 / 15 / 15 % of images, ieee8023 adults
    55 / 15 / 30 % (a larger test share, so the adult-only measurement has adults without COVID-19 to count)."""
    fractions = {"child": {"training": 0.7, "validation": 0.15, "test": 0.15},
                 "adult": {"training": 0.55, "validation": 0.15, "test": 0.3}}
    items = resnet18_items(cxr_root)
    parts: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for domain, frac in fractions.items():
        for part, members in group_split([it for it in items if it["domain"] == domain], frac, seed=seed).items():
            parts[part] += members
    return _datalist(
        "non-COVID-19 (Kermany normal children + ieee8023 adults without COVID-19) vs COVID-19 (ieee8023 adults), "
        "split by patient within each domain",
        RESNET18_CLASSES,
        parts,
        split={"unit": "patient", "seed": seed, "fractions": fractions},
        domains={p: dict(Counter(f"{it['domain']}/{RESNET18_CLASSES[it['label']]}" for it in v)) for p, v in parts.items()},
    )


def build_detl_datalist(cxr_root: str | os.PathLike, k: int = 5, seed: int = 0) -> dict:
    """DETL datalist: stage-A parts from the Kermany *source* pool and ``k`` stage-B folds from the rest.

    Kermany patients are halved (stratified) into a source pool (stage A: normal vs disease, split 85 / 15
    into ``stage_a_training`` / ``stage_a_validation``) and a target pool, which with all ieee8023 images
    forms the 4-class stage-B data split into ``fold0`` .. ``fold{k-1}`` by patient. No image (and no
    patient) of the stage-B folds is seen by stage A, so every fold's held-out images are new to the whole
    two-stage training.
    """
    items = detl_items(cxr_root)
    kermany = [it for it in items if it["patient"].startswith("kermany:")]
    ieee = [it for it in items if not it["patient"].startswith("kermany:")]
    pools = group_split(kermany, {"source": 0.5, "target": 0.5}, group_key="patient", seed=seed)
    normal = DETL_TARGET_CLASSES.index("normal")
    source = [{**it, "label": 0 if it["label"] == normal else 1} for it in pools["source"]]
    stage_a = group_split(source, {"stage_a_training": 0.85, "stage_a_validation": 0.15}, group_key="patient",
                          seed=seed)
    folds = patient_kfold(pools["target"] + ieee, k=k, seed=seed)
    dl = _datalist(
        f"DETL: stage A normal vs disease on half of the Kermany patients; stage B 4 classes, {k} folds by patient",
        DETL_TARGET_CLASSES,
        {f"fold{i}": f for i, f in enumerate(folds)},
        source_class_names=list(DETL_SOURCE_CLASSES),
        split={"unit": "patient", "seed": seed, "folds": k, "source_pool": "50% of Kermany patients"},
    )
    dl["stage_a_counts"] = {k2: count_classes(v, DETL_SOURCE_CLASSES) for k2, v in stage_a.items()}
    dl.update(stage_a)
    return dl


def build_vbreathnet_datalist(
    cxr_root: str | os.PathLike, seed: int = 0, quality_filter=None, loader=None
) -> dict:
    """V-BreathNet datalist: quality-curated images (:func:`ctcovid.transforms.curate`), then a patient-level
    training / validation / test split (70 / 15 / 15 %). The removed images and why are listed under
    ``curation``."""
    from ctcovid.transforms.quality import ImageQualityFilter, curate

    root = Path(cxr_root)
    items = vbreathnet_items(root)
    qf = quality_filter or ImageQualityFilter()
    absolute = [{**it, "image": str(root / it["image"]), "rel": it["image"]} for it in items]
    report = curate(absolute, qf, loader=loader)
    kept = [{k: v for k, v in it.items() if k not in ("quality", "rel")} | {"image": it["rel"]} for it in report.kept]
    fractions = {"training": 0.7, "validation": 0.15, "test": 0.15}
    parts = group_split(kept, fractions, group_key="patient", seed=seed)
    summary = report.summary()
    summary["removed_by_label"] = {
        VBREATHNET_CLASSES[int(k)]: v for k, v in summary["removed_by_label"].items() if k != ""
    }
    curation = {
        "filter": {"blur_threshold": qf.blur_threshold, "contrast_range": list(qf.contrast_range or []),
                   "analysis_size": qf.analysis_size},
        "summary": summary,
        "removed": [
            {"image": it["rel"], "label": VBREATHNET_CLASSES[int(it["label"])], "reasons": it["quality"]["reasons"]}
            for it in sorted(report.removed, key=lambda x: x["rel"])
        ],
    }
    return _datalist(
        "COVID-19 / normal / pneumonia, quality-curated (blur, contrast), split by patient",
        VBREATHNET_CLASSES,
        parts,
        split={"unit": "patient", "seed": seed, "fractions": fractions},
        curation=curation,
    )


def write_datalist(dl: dict, path: str | os.PathLike) -> Path:
    """Write a datalist atomically (indented JSON)."""
    return write_json_atomic(dl, path)
