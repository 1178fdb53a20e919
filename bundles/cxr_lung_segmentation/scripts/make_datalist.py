"""Write configs/datalist.json: the ieee8023 manual lung masks split by patient (seeded).

Usage (from the repository root)::

    python bundles/cxr_lung_segmentation/scripts/make_datalist.py [--data_root ../shared/data/cxr/ieee8023]

Items are the rows of ``labels.csv`` with a ``lung_mask`` (V7 Labs manual masks, binarised; > 0 = lung).
Masks with no lung pixel are excluded (the upstream V7 set has 24 empty X-ray masks; the shared copy already
left them out, the check stays so a fresh copy gives the same list). The split is by ``patientid`` with
:func:`ctcovid.training.splits.group_split` (seed 0): 70 % training, 10 % validation (checkpoint
selection), 20 % test (the Dice reported in docs/README.md). Paths are relative to the data root.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ctcovid.cxr.datalists import group_split

HERE = Path(__file__).resolve().parents[1]
FRACTIONS = {"training": 0.7, "validation": 0.1, "test": 0.2}
SEED = 0


def main() -> None:
    default_root = os.environ.get("CTCOVID_DATA", str(HERE.parents[2] / "shared" / "data"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_root", default=str(Path(default_root) / "cxr" / "ieee8023"))
    ap.add_argument("--output", default=str(HERE / "configs" / "datalist.json"))
    args = ap.parse_args()
    root = Path(args.data_root)
    with open(root / "labels.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lung_mask")]
    items, empty = [], []
    for r in rows:
        if not (root / r["filename"]).exists():
            continue
        if not np.asarray(Image.open(root / r["lung_mask"])).any():
            empty.append(r["lung_mask"])
            continue
        # group_split stratifies by "label": one stratum, the mask is the segmentation target.
        items.append({"image": r["filename"], "label": r["lung_mask"], "patient": r["patientid"],
                      "view": r["view"], "stratum": 0})
    parts = group_split([{**it, "label": it["stratum"]} for it in items], FRACTIONS, group_key="patient", seed=SEED)
    by_image = {it["image"]: it for it in items}
    out = {
        "description": "ieee8023 chest X-rays with manual V7 Labs lung masks (> 0 = lung), split by patientid",
        "split": {"unit": "patientid", "seed": SEED, "fractions": FRACTIONS,
                  "function": "ctcovid.training.splits.group_split"},
        "excluded_empty_masks": sorted(empty),
        "counts": {},
    }
    for name, part in parts.items():
        entries = [{k: by_image[it["image"]][k] for k in ("image", "label", "patient", "view")} for it in part]
        out[name] = entries
        out["counts"][name] = {"images": len(entries), "patients": len({e["patient"] for e in entries})}
    pats = [{e["patient"] for e in out[n]} for n in FRACTIONS]
    assert not (pats[0] & pats[1] or pats[0] & pats[2] or pats[1] & pats[2]), "a patient is in two parts"
    tmp = Path(args.output).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, args.output)
    print(json.dumps(out["counts"]), f"excluded empty masks: {len(empty)}")


if __name__ == "__main__":
    main()
