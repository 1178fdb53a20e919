"""The X-ray cascade on held-out *adult* radiographs (ieee8023), and its speed with Grad-CAM (issue 18).

Held-out adults: the stage-2 datalist's ``test`` patients (COVID-19 and other viral; stage 2 never saw them) plus
every frontal ieee8023 image whose finding is not viral (bacterial, fungal, normal, other) from a patient in
no training or validation part of the stage-2 datalist or of stage 1's adult datalist (``datalist_adult.json``,
whose adult films fine-tune stage 1), so none of these trained either stage. The set is defined by the
repository's datalists, also when ``--bundles`` points at other weights (e.g. the weights before the adult
fine-tune), so before/after numbers are on the same images. COVID-19 is the positive class: sensitivity = COVID-19 films labelled COVID-19 by the cascade,
specificity = the other adult films not labelled COVID-19, each with a Wilson 95 % interval. Also recorded:
where stage 1 routes the adult COVID-19 films (normal / bacterial / viral, above or below Th_Vir), the ROC AUC of
the cascade's COVID-19 score and the best sensitivity reachable at specificity >= 0.70 on that curve.

Speed: seconds per radiograph of ``ctcovid cxr predict`` work (read, both stages where the threshold is
passed, Grad-CAM overlay written), median over the images after one warm-up, on this machine's CPU.

    python benchmarks/cxr_cascade_adult_eval.py [--out benchmarks/results/cxr_cascade_adult.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def adult_items(data_root: Path, stage2_datalist: Path, stage1_adult_datalist: Path) -> list[dict]:
    dl = json.loads(stage2_datalist.read_text())
    seen = {it["patient"] for part in ("training", "validation") for it in dl[part]}
    if stage1_adult_datalist.is_file():
        adult = json.loads(stage1_adult_datalist.read_text())
        seen |= {it["patient"] for part in ("training", "validation") for it in adult[part] if it["domain"] == "adult"}
    items = [
        {"image": str(data_root / it["image"]), "covid": it["label"] == 0, "finding": "COVID-19" if it["label"] == 0
         else "viral-other", "patient": it["patient"]}
        for it in dl["test"]
    ]
    with open(data_root / "labels.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if (r["coarse_class"] in ("viral", "unlabeled") or r["file_present"] != "True"
                    or r["view"] not in ("PA", "AP", "AP Supine") or r["patientid"] in seen):
                continue
            items.append({"image": str(data_root / r["filename"]), "covid": False, "finding": r["coarse_class"],
                          "patient": r["patientid"]})
    return items


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from common import write_result_file
    from sklearn.metrics import roc_auc_score, roc_curve

    from ctcovid.cxr.cascade import CXRCascade
    from ctcovid.metrics import auc_ci_by_patient
    from ctcovid.metrics import proportion_ci as wilson
    from ctcovid.training.data_root import default_data_root

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=default_data_root(), help="shared data folder (default: $CTCOVID_DATA or ../shared/data)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cxr_cascade_adult.json"))
    p.add_argument("--speed-images", type=int, default=20)
    p.add_argument("--bundles", default=None, help="folder holding both cascade bundles (default: the repository's)")
    args = p.parse_args(argv)

    data_root = Path(args.data) / "cxr" / "ieee8023"
    items = adult_items(data_root, ROOT / "bundles" / "cxr_covid_viral_classification" / "configs" / "datalist.json",
                        ROOT / "bundles" / "cxr_pneumonia_type_classification" / "configs" / "datalist_adult.json")
    cascade = CXRCascade.from_bundles(args.bundles, device="cpu")
    rows = []
    for it in items:
        r = cascade.predict(it["image"], stage2_for_all=True)
        s1 = r.stage1_probabilities
        covid_score = s1["viral"] * (r.stage2_probabilities or {}).get("COVID-19", 0.0)
        rows.append({**it, "label": r.label, "stage1": max(s1, key=s1.get), "passed": r.passed_threshold,
                     "covid_score": covid_score})
    pos = [r for r in rows if r["covid"]]
    neg = [r for r in rows if not r["covid"]]
    tp = sum(r["label"] == "COVID-19" for r in pos)
    tn = sum(r["label"] != "COVID-19" for r in neg)
    y = np.array([r["covid"] for r in rows], dtype=int)
    s = np.array([r["covid_score"] for r in rows])
    fpr, tpr, _ = roc_curve(y, s)
    reachable = float(tpr[(1 - fpr) >= 0.70].max()) if np.any((1 - fpr) >= 0.70) else None
    routing = {c: sum(r["stage1"] == c for r in pos) for c in ("normal", "bacterial", "viral")}

    speed_imgs = [r["image"] for r in rows[: args.speed_images + 1]] if args.speed_images > 0 else []
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, img in enumerate(speed_imgs):
            t = time.perf_counter()
            cascade.predict(img, overlay_path=Path(tmp) / f"{i}.png")
            times.append(time.perf_counter() - t)
    result = {
        "what": "Cascade-SEME on held-out adult ieee8023 radiographs; COVID-19 positive",
        "images": len(rows), "patients": len({r["patient"] for r in rows}),
        "covid19_images": len(pos), "other_images": len(neg),
        "other_findings": {f: sum(r["finding"] == f for r in neg) for f in sorted({r["finding"] for r in neg})},
        "viral_threshold": cascade.threshold,
        "sensitivity": round(tp / len(pos), 4) if pos else None, "sensitivity_ci95": wilson(tp, len(pos)),
        "specificity": round(tn / len(neg), 4) if neg else None, "specificity_ci95": wilson(tn, len(neg)),
        "covid19_routed_by_stage1": routing,
        "covid19_passed_threshold": sum(r["passed"] for r in pos),
        "auc_covid_score": round(float(roc_auc_score(y, s)), 4) if len(set(y)) == 2 else None,
        "auc_covid_score_ci95_patient_bootstrap": auc_ci_by_patient(y, s, [r["patient"] for r in rows]),
        "best_sensitivity_at_specificity_0.70": reachable,
        "seconds_per_radiograph_with_gradcam": {
            "median": round(statistics.median(times[1:]), 4), "max": round(max(times[1:]), 4), "n": len(times) - 1,
            "cpu": platform.processor() or platform.machine(), "threads": int(os.environ.get("OMP_NUM_THREADS", 0))
            or None,
        } if len(times) > 1 else None,  # --speed-images 0: accuracy only
        "per_image": [
            {"image": Path(r["image"]).name, **{k: r[k] for k in ("patient", "finding", "label", "stage1")},
             "covid_score": round(r["covid_score"], 4)}
            for r in rows
        ],
        "models": cascade.models(),
        "date": time.strftime("%Y-%m-%d"),
    }
    write_result_file(result, args.out, hide=("models", "per_image"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
