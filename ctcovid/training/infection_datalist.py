"""Build the committed datalist of the infection bundle (``ct_lung_infection_segmentation``) from ``../shared/data``.

``python -m ctcovid.training.infection_datalist --data_root ../shared/data`` rewrites
``bundles/ct_lung_infection_segmentation/configs/datalist.json`` (paths relative to ``data_root``).

Split (whole volumes / estimated patients, never slices of one volume on both sides):

- **test**: MedSeg ``rp4`` and ``rp8``, the two volumes with the most infection (13.8 % and 1.5 % of the
  lung). The ma2020 slices of the same patients (copies found by :mod:`ctcovid.training.ma2020`, and the
  rest of their estimated patient group) are excluded from training and validation.
- **training**: MedSeg ``rp2`` and ``rp6`` (every slice: infected, lesion-free lung and non-lung slices),
  the remaining ma2020 slices (all infected, 8-bit CLAHE: flagged ``equalised``), and HU negatives: every slice of
  TotalSegmentator's ``example_ct`` (abdomen, pelvis and lung bases, no lesion) with an empty mask, the only
  HU chest/abdomen slices with a known "no infection" answer besides the held-out ``normal002``.
- **validation** (model selection only): two estimated ma2020 patient groups (:data:`DEFAULT_VAL_GROUPS`).
- **test_hu**: COVID-CT-MD ``normal002`` (HU, a normal scan: no reference mask, involvement must stay near 0).

MedSeg infection masks hold codes 127 / 255 (probably ground glass / consolidation, rescaled per volume):
any non-zero value is infection (``label_threshold: 0``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ctcovid.training.lung_datalist import grouped_ma2020, ma_item, medseg_item, write_datalist
from ctcovid.training.slices import default_data_root

__all__ = ["build_infection_datalist", "main", "TEST_CASES", "TRAIN_CASES"]

TRAIN_CASES = ("rp2", "rp6")
TEST_CASES = ("rp4", "rp8")
BUNDLE = "ct_lung_infection_segmentation"
#: Validation: one coronacases.org volume (files 0970-1080, 111 slices) and one Radiopaedia volume outside
#: the MedSeg subset (1376-1441, 66 slices), as grouped by :func:`ctcovid.training.ma2020.analyse_ma2020`
#: on the 1381-slice release (the group names follow the files each group starts at).
DEFAULT_VAL_GROUPS = ("ma0970", "ma1376")

_MEDSEG = "ct/medseg"
_MA = "ct/ma2020_slices"
_TS = "fixtures/totalsegmentator_example_ct"


def _medseg_item(case: str) -> dict:
    return medseg_item(
        case, "infection_masks", label_threshold=0, lung=f"{_MEDSEG}/lung_masks/{case}.nii.gz"
    )


def _equalised_ma_item(name: str, group: str) -> dict:
    """An ma2020 slice with its infection mask, flagged ``equalised``: the PNGs are CLAHE images already, so
    the training and validation CLAHE (``CLAHEd(skip_key="equalised")``) leaves them as they are -- the
    network then reads every image equalised once, as at inference."""
    return {**ma_item(name, group, "infection"), "equalised": True}


def build_infection_datalist(data_root, val_groups: Sequence[str] = DEFAULT_VAL_GROUPS) -> dict:
    """The infection datalist as a JSON-ready dict (paths relative to ``data_root``)."""
    records = grouped_ma2020(data_root, val_groups)
    train, val, excluded = [], [], []
    for r in records:
        held_out = set(r.group.split("+")) & set(TEST_CASES)
        if held_out:
            why = f"copy of {r.medseg_case} slice {r.medseg_slice}" if r.medseg_case else "same estimated patient"
            excluded.append({"image": f"{_MA}/ct/{r.name}", "group": r.group, "reason": f"test volume(s) {sorted(held_out)}: {why}"})
        elif r.group in val_groups:
            val.append(_equalised_ma_item(r.name, r.group))
        else:
            train.append(_equalised_ma_item(r.name, r.group))
    negatives = {
        "image": f"{_TS}/example_ct.nii.gz",
        "slice_label": 0,
        "case": "totalseg_example_ct",
        "source": "totalsegmentator",
        "domain": "hu",
        "note": "HU abdomen-pelvis CT with lung bases, no lesion: every slice an empty infection mask",
    }
    normal = {
        "image": "ct/covid_ct_md/normal002",
        "case": "covid_ct_md_normal002",
        "source": "covid_ct_md",
        "domain": "hu",
        "note": "normal chest CT, no reference mask: predicted lung involvement must stay near 0 %",
    }
    return {
        "description": f"{BUNDLE}: 2D infection (COVID-19 opacity) segmentation slices. Split by volume / "
        "estimated patient.",
        "generated_by": "python -m ctcovid.training.infection_datalist --data_root <data_root>",
        "data_root": "paths are relative to data_root (default ../shared/data from the repository root)",
        "training": [_medseg_item(c) for c in TRAIN_CASES] + [negatives] + train,
        "validation": val,
        "test": [_medseg_item(c) for c in TEST_CASES],
        "test_hu": [normal],
        "excluded": excluded,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default=default_data_root(), help="shared data folder (default: %(default)s)")
    parser.add_argument("--val_groups", nargs="+", default=list(DEFAULT_VAL_GROUPS))
    args = parser.parse_args(argv)
    write_datalist(build_infection_datalist(args.data_root, args.val_groups), BUNDLE)


if __name__ == "__main__":
    main()
