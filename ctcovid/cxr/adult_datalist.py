"""Stage-1 datalist with adult radiographs: Kermany children plus ieee8023 adults (issue 18, item 3).

Stage 1 (normal / bacterial / viral) learnt from Kermany's children only and routed most adult COVID-19
films to "bacterial" (``benchmarks/results/cxr_cascade_adult.json``). The adult extension adds ieee8023's
frontal adult films to stage-1 training without breaking either stage's held-out patients:

- Kermany items keep the patient split of ``datalist.json`` (paths prefixed ``kermany/``);
- adult viral films (COVID-19 and other viral, label ``viral``) follow the stage-2 datalist: its
  ``training`` patients train, its ``validation`` patients validate, its ``test`` patients stay held out
  for the cascade;
- adult ``normal`` (No Finding) and ``bacterial`` films are split by patient (``training`` / ``test``); a
  patient who also has viral films follows that patient's stage-2 part;
- fungal, "other" and unlabeled findings never train (they are none of the three classes).

Paths are relative to the ``cxr`` data folder (``../shared/data/cxr``), so one ``data_root`` serves both sets.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from ctcovid.cxr.datalists import FRONTAL_VIEWS, STAGE1_CLASSES, _read_csv, load_datalist
from ctcovid.io.atomic import write_json_atomic
from ctcovid.training.splits import balanced_subset, group_split

ADULT_PARTS = ("training", "validation", "calibration", "test")
_STAGE1_LABEL = {"normal": 0, "bacterial": 1, "viral": 2}


def adult_stage1_items(ieee_root: str | os.PathLike) -> list[dict]:
    """ieee8023 frontal films that belong to a stage-1 class: ``image`` (relative to ieee8023), ``label``, ``patient``."""
    items = []
    for r in _read_csv(Path(ieee_root) / "labels.csv"):
        if (
            r["coarse_class"] not in _STAGE1_LABEL
            or r["view"] not in FRONTAL_VIEWS
            or r["file_present"] != "True"
        ):
            continue
        items.append(
            {"image": r["filename"], "label": _STAGE1_LABEL[r["coarse_class"]], "patient": r["patientid"]}
        )
    return items


def make_adult_datalist(
    kermany_datalist: dict, stage2_datalist: dict, adult_items: Sequence[dict], seed: int = 0
) -> dict:
    """The adult-extension datalist (see the module docstring) from the two committed datalists."""
    part_of = {
        it["patient"]: part for part in ("training", "validation", "test") for it in stage2_datalist[part]
    }
    followers = [it for it in adult_items if it["patient"] in part_of]
    rest = [
        it for it in adult_items if it["patient"] not in part_of and it["label"] != _STAGE1_LABEL["viral"]
    ]
    unseen_viral = [
        it for it in adult_items if it["patient"] not in part_of and it["label"] == _STAGE1_LABEL["viral"]
    ]
    split_rest = group_split(rest, {"training": 0.6, "test": 0.4}, seed=seed)
    out: dict = {part: [] for part in ADULT_PARTS}
    for part in ADULT_PARTS:
        out[part] += [
            {**it, "image": "kermany/" + it["image"], "domain": "child"} for it in kermany_datalist[part]
        ]
    adult_parts = {
        part: [it for it in followers if part_of[it["patient"]] == part]
        for part in ("training", "validation", "test")
    }
    adult_parts["training"] += split_rest["training"]
    adult_parts["test"] += split_rest["test"] + unseen_viral  # viral films stage 2 never listed: held out
    for part, members in adult_parts.items():
        out[part] += [{**it, "image": "ieee8023/" + it["image"], "domain": "adult"} for it in members]
    counts = {
        part: {
            dom: {
                c: sum(1 for it in out[part] if it["domain"] == dom and it["label"] == i)
                for i, c in enumerate(STAGE1_CLASSES)
            }
            for dom in ("child", "adult")
        }
        for part in ADULT_PARTS
    }
    return {
        "description": (
            "Stage 1 with adults: Kermany children (datalist.json's patient split) + ieee8023 adult frontal films "
            "(viral: the stage-2 datalist's parts; normal/bacterial: split by patient, 60 % training / 40 % test); "
            "paths relative to the cxr data folder"
        ),
        "class_names": list(STAGE1_CLASSES),
        "split": {"unit": "patient", "seed": seed},
        "counts": counts,
        **out,
    }


def build_adult_datalist(bundles_dir: str | os.PathLike, cxr_root: str | os.PathLike) -> dict:
    """Write ``cxr_pneumonia_type_classification/configs/datalist_adult.json``; returns its counts."""
    bundles_dir = Path(bundles_dir)
    s1 = json.loads(
        (bundles_dir / "cxr_pneumonia_type_classification" / "configs" / "datalist.json").read_text()
    )
    s2 = json.loads(
        (bundles_dir / "cxr_covid_viral_classification" / "configs" / "datalist.json").read_text()
    )
    dl = make_adult_datalist(s1, s2, adult_stage1_items(Path(cxr_root) / "ieee8023"))
    write_json_atomic(
        dl, bundles_dir / "cxr_pneumonia_type_classification" / "configs" / "datalist_adult.json"
    )
    return dl["counts"]


def load_adult_training(
    datalist_file: str | os.PathLike,
    data_root: str | os.PathLike,
    child_limit: int | None = None,
    adult_repeat: Sequence[int] = (1, 1, 1),
    seed: int = 0,
    lung_masks: bool = False,
    mask_root: str | os.PathLike | None = None,
) -> list[dict]:
    """The adult datalist's ``training`` items, absolute paths; children subsampled, adults repeated.

    Args:
        datalist_file: ``datalist_adult.json``.
        data_root: the ``cxr`` data folder.
        child_limit: keep a class-balanced subset of this many Kermany images (fine-tuning need not see all).
        adult_repeat: how often each adult image of class normal / bacterial / viral appears per epoch
            (adult normal and bacterial films are few; repeating them keeps "adult" from meaning "viral").
        seed: subset and shuffle seed.
        lung_masks, mask_root: add each image's ``lung_mask`` for regional learning, as
            :func:`ctcovid.cxr.datalists.load_datalist` does (``ctcovid cxr lung-masks --stage adult`` writes them).
    """
    items = load_datalist(datalist_file, "training", data_root, lung_masks=lung_masks, mask_root=mask_root)
    child = [it for it in items if it.get("domain") != "adult"]
    adult = [it for it in items if it.get("domain") == "adult"]
    if child_limit is not None and child_limit < len(child):
        child = balanced_subset(child, int(child_limit), seed)
    repeated = [it for it in adult for _ in range(int(adult_repeat[it["label"]]))]
    out = child + repeated
    random.Random(seed).shuffle(out)
    return out
