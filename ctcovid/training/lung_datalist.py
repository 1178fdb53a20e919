"""Build the committed datalists of the two lung bundles from ``../shared/data``.

``python -m ctcovid.training.lung_datalist --data_root ../shared/data`` rewrites
``bundles/ct_lung_segmentation/configs/datalist.json`` and ``bundles/ct_lung_slice_filter/configs/datalist.json``.
Paths in them are relative to ``data_root`` (what :func:`ctcovid.training.resolve_datalist` joins them with).

Split (whole volumes / estimated patients, never slices of one volume on both sides):

- **test**: MedSeg ``rp6`` and ``rp8`` (display 0-4095). Two volumes rather than one because rp8 has lung
  on every slice (no negatives for the slice filter) and an unusual display window, while rp6 has 12
  non-lung slices below the lungs. The ma2020 slices copied from these two volumes (found by
  :mod:`ctcovid.training.ma2020`) are excluded from training and validation.
- **training**: MedSeg ``rp2``, ``rp4`` (all slices, non-lung slices included) + the remaining ma2020 slices
  + the 82 HU abdomen-pelvis slices of TotalSegmentator ``example_ct`` below the ``example_ct_sm`` crop, as
  empty-mask negatives (HU bowel gas was the segmenter's known false positive). They are the same patient
  as the HU test crop (other slices): that test is no longer patient-independent, and the docs say so.
- **validation** (model selection only): whole estimated ma2020 patient groups, by default one coronacases
  volume and one Radiopaedia volume not in the MedSeg subset.
- **HU evaluation**: TotalSegmentator ``example_ct_sm`` (lobes 10-14 as reference; its slices are never
  trained on) and COVID-CT-MD ``normal002`` (no reference mask: lung volume check; never trained on).

The slice filter validates on MedSeg ``rp4`` plus the ma2020 validation groups (the latter are all lung
slices; model selection needs non-lung slices too) and trains on ``rp2``; it adds the 82 abdomen-pelvis slices of TotalSegmentator ``example_ct`` below the
``example_ct_sm`` crop (slices 0-81; the lobe labels of the crop show no lung below its slice 19, so the
lower slices cannot hold lung) as HU negatives for training; its HU test is ``example_ct_sm``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from ctcovid.training.ma2020 import analyse_ma2020, group_members
from ctcovid.training.slices import default_data_root

__all__ = [
    "build_lung_datalists",
    "grouped_ma2020",
    "ma_item",
    "main",
    "medseg_item",
    "MEDSEG_CASES",
    "TOTALSEG_LUNG_LABELS",
    "write_datalist",
]

MEDSEG_CASES = ("rp2", "rp4", "rp6", "rp8")
TRAIN_CASES = ("rp2", "rp4")
TEST_CASES = ("rp6", "rp8")
#: TotalSegmentator "total" v2 lobe labels (upper/lower left, upper/middle/lower right).
TOTALSEG_LUNG_LABELS = (10, 11, 12, 13, 14)
#: Default validation groups: the ma2020 files starting the coronacases volume at 0970 and the
#: Radiopaedia volume at 1376 (named by :func:`ctcovid.training.ma2020.analyse_ma2020`).
DEFAULT_VAL_GROUPS = ("ma0970", "ma1376")
#: ``example_ct.nii.gz`` slices 82-111 are ``example_ct_sm.nii.gz`` (checked voxel by voxel).
EXAMPLE_CT_SM_OFFSET = 82

_MEDSEG = "ct/medseg"
_MA = "ct/ma2020_slices"
_TS = "fixtures/totalsegmentator_example_ct"


def medseg_item(case: str, masks: str = "lung_masks", **extra) -> dict:
    """Datalist item of MedSeg volume ``case`` with its ``masks`` folder's mask as label."""
    return {
        "image": f"{_MEDSEG}/images/{case}.nii.gz",
        "label": f"{_MEDSEG}/{masks}/{case}.nii.gz",
        **extra,
        "case": case,
        "source": "medseg",
        "domain": "display",
    }


def ma_item(name: str, group: str, masks: str = "lungs") -> dict:
    """Datalist item of ma2020 slice ``name`` (estimated patient ``group``) with its ``masks`` folder's mask."""
    return {
        "image": f"{_MA}/ct/{name}",
        "label": f"{_MA}/{masks}/{name}",
        "case": f"ma2020/{group}",
        "source": "ma2020",
        "domain": "display",
    }


def _hu_items() -> list[dict]:
    return [
        {
            "image": f"{_TS}/example_ct_sm.nii.gz",
            "label": f"{_TS}/example_seg.nii.gz",
            "label_values": list(TOTALSEG_LUNG_LABELS),
            "case": "totalseg_example_ct_sm",
            "source": "totalsegmentator",
            "domain": "hu",
        },
        {
            "image": "ct/covid_ct_md/normal002",
            "case": "covid_ct_md_normal002",
            "source": "covid_ct_md",
            "domain": "hu",
            "note": "no reference mask; anatomical check: adult lung volume 2-8 L",
        },
    ]


def grouped_ma2020(data_root: str | os.PathLike, val_groups: Sequence[str]) -> list:
    """The ma2020 slices with their estimated patient groups and MedSeg copies
    (:func:`ctcovid.training.ma2020.analyse_ma2020`); raises ``ValueError`` for unknown ``val_groups``."""
    root = Path(data_root)
    medseg = {
        c: (root / _MEDSEG / "images" / f"{c}.nii.gz", root / _MEDSEG / "lung_masks" / f"{c}.nii.gz")
        for c in MEDSEG_CASES
    }
    records = analyse_ma2020(root / _MA, medseg)
    groups = group_members(records)
    unknown = [g for g in val_groups if g not in groups]
    if unknown:
        raise ValueError(f"validation groups {unknown} not found; groups are {sorted(groups)}")
    return records


def write_datalist(obj: dict, bundle: str) -> None:
    """Write ``obj`` as ``bundles/<bundle>/configs/datalist.json`` (atomically) and say what it holds."""
    from ctcovid.bundle import bundle_path

    out = Path(bundle_path(bundle)) / "configs" / "datalist.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(obj, out)
    print(
        f"{out}: {len(obj['training'])} training, {len(obj['validation'])} validation, "
        f"{len(obj['test'])} test items, {len(obj['excluded'])} excluded"
    )


def build_lung_datalists(
    data_root: str | os.PathLike, val_groups: Sequence[str] = DEFAULT_VAL_GROUPS
) -> tuple[dict, dict]:
    """Return ``(segmentation datalist, slice-filter datalist)`` as JSON-ready dicts (paths relative to ``data_root``)."""
    records = grouped_ma2020(data_root, val_groups)
    groups = group_members(records)
    train, val, excluded = [], [], []
    for r in records:
        cases = set(r.group.split("+")) & set(MEDSEG_CASES)
        if cases & set(TEST_CASES):
            excluded.append(
                {
                    "image": f"{_MA}/ct/{r.name}",
                    "group": r.group,
                    "reason": f"same patient as test volume(s) {sorted(cases & set(TEST_CASES))}"
                    + (
                        f" (copy of {r.medseg_case} slice {r.medseg_slice}: mask Dice {r.match_dice}, "
                        f"image correlation {r.match_corr})"
                        if r.medseg_case
                        else " (same estimated patient group)"
                    ),
                }
            )
        elif r.group in val_groups:
            val.append(ma_item(r.name, r.group))
        else:
            train.append(ma_item(r.name, r.group))

    provenance = {
        "generated_by": "python -m ctcovid.training.lung_datalist --data_root <data_root>",
        "data_root": "paths are relative to data_root (default ../shared/data from the repository root)",
        "ma2020_groups": {g: [m[0], m[-1], len(m)] for g, m in groups.items()},
    }
    example_ct_negatives = {
        "image": f"{_TS}/example_ct.nii.gz",
        "slices": [0, EXAMPLE_CT_SM_OFFSET],
        "slice_label": 0,
        "case": "totalseg_example_ct_below_sm",
        "source": "totalsegmentator",
        "domain": "hu",
        "note": "abdomen-pelvis slices 0-81, below the example_ct_sm crop whose lowest 19 slices hold no lung",
    }
    seg = {
        "description": "ct_lung_segmentation: 2D lung segmentation slices. Split by volume / estimated patient.",
        **provenance,
        # the only HU slices with a known answer: bowel gas in HU, the segmenter's known false positive
        "training": [medseg_item(c) for c in TRAIN_CASES] + [example_ct_negatives] + train,
        "validation": val,
        "test": [medseg_item(c) for c in TEST_CASES],
        "test_hu": _hu_items(),
        "excluded": excluded,
    }
    filt = {
        "description": "ct_lung_slice_filter: per-slice lung / non-lung labels derived from lung masks "
        "(lung if the mask covers at least min_area of the slice).",
        **provenance,
        # rp4 validates: the ma2020 validation slices are all lung, model selection needs negatives too
        "training": [medseg_item("rp2"), example_ct_negatives] + train,
        "validation": [medseg_item("rp4")] + val,
        "test": [medseg_item(c) for c in TEST_CASES] + [_hu_items()[0]],
        "test_unlabelled": [_hu_items()[1]],
        "excluded": excluded,
    }
    return seg, filt


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> None:

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data_root", default=default_data_root(), help="shared data folder (default: %(default)s)"
    )
    parser.add_argument("--val_groups", nargs="+", default=list(DEFAULT_VAL_GROUPS))
    args = parser.parse_args(argv)
    seg, filt = build_lung_datalists(args.data_root, args.val_groups)
    for name, obj in (("ct_lung_segmentation", seg), ("ct_lung_slice_filter", filt)):
        write_datalist(obj, name)


if __name__ == "__main__":
    main()
