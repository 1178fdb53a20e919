"""ResNet-18 / CBAM-ResNet-18 (COVID-19 vs normal) on their test split and on held-out *adult* films only (issue 18).

Every COVID-19 film is an adult ieee8023 film and 99 % of the normals are Kermany children, so the test split
alone cannot tell "COVID-19" from "adult chest film". The adult probe removes the age difference: the
test part's ieee8023 films (COVID-19 and "No Finding") plus every other labelled ieee8023 film (other pneumonias,
ARDS, ...) of a patient the training never saw (:func:`ctcovid.cxr.datasets.adult_probe_items`). On it,
COVID-19 is the positive class: sensitivity = COVID-19 films called COVID-19, specificity = adult films
without COVID-19 not called COVID-19 (Wilson 95 % intervals), and the ROC AUC of p(COVID-19) with a
patient-level bootstrap interval. A network that learnt only "adult film" has adult specificity near 0 and
adult AUC near 0.5.

    python benchmarks/cxr_covid_resnet18_adult_eval.py [--out benchmarks/results/cxr_covid_resnet18.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"resnet18": ("model.pt", False), "cbam_resnet18": ("model_cbam.pt", True)}


def predict_covid(bundle: Path, model_file: str, cbam: bool, images: list[str], batch: int = 16) -> np.ndarray:
    """p(COVID-19) of each image with the bundle's inference preprocessing and network, fp32 on CPU."""
    import torch
    from monai.bundle import ConfigParser

    from ctcovid.bundle.loading import read_state_dict

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "use_cbam": cbam, "device": "$torch.device('cpu')"})
    net = parser.get_parsed_content("network_def", instantiate=True)
    net.load_state_dict(read_state_dict(bundle / "models" / model_file), strict=True)
    net.eval()
    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    covid = list(parser["class_names"]).index("COVID-19")
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.stack([torch.as_tensor(pre({"image": p})["image"]) for p in images[i : i + batch]])
            out.append(torch.softmax(net(x), dim=1)[:, covid].numpy())
    return np.concatenate(out)


def binary_summary(y: np.ndarray, p: np.ndarray, patients: list[str]) -> dict:
    """Counts, sensitivity / specificity (Wilson intervals) and AUC (patient bootstrap) of p(COVID-19) for the
    binary labels ``y`` (1 = COVID-19), from the project's classification report."""
    from ctcovid.metrics import auc_ci_by_patient, classification_report, proportion_ci

    rep = classification_report(y, np.stack([1 - p, p], axis=1), ["not COVID-19", "COVID-19"])
    (tn, _), (_, tp) = rep["confusion_matrix"]
    covid = rep["per_class"]["COVID-19"]
    npos, nneg = int((y == 1).sum()), int((y == 0).sum())
    return {
        "images": len(y), "patients": len(set(patients)), "covid19": npos, "not_covid19": nneg,
        "accuracy": round(rep["accuracy"], 4),
        "sensitivity": round(tp / npos, 4) if npos else None, "sensitivity_ci95": proportion_ci(tp, npos),
        "specificity": round(tn / nneg, 4) if nneg else None, "specificity_ci95": proportion_ci(tn, nneg),
        "auc": round(covid["auc"], 4) if covid["auc"] is not None else None,
        "auc_ci95_patient_bootstrap": auc_ci_by_patient(y, p, patients),
    }


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from ctcovid.bundle.loading import weights_hash
    from ctcovid.cxr.datasets import adult_probe_items
    from ctcovid.io.atomic import write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("CTCOVID_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--bundle", default=str(ROOT / "bundles" / "cxr_covid_resnet18_classification"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cxr_covid_resnet18.json"))
    ap.add_argument("--note", default="", help="free text stored in the result (e.g. which training run)")
    args = ap.parse_args(argv)

    cxr = Path(args.data) / "cxr"
    bundle = Path(args.bundle)
    datalist = json.loads((bundle / "configs" / "datalist.json").read_text())
    covid = list(datalist["class_names"]).index("COVID-19")
    test = datalist["test"]
    probe = adult_probe_items(cxr, datalist, covid)
    images = sorted({it["image"] for it in test} | {it["image"] for it in probe})
    result = {"what": __doc__.split("\n")[0], "date": time.strftime("%Y-%m-%d"), "note": args.note, "threshold": 0.5,
              "adult_probe_findings": dict(Counter(it["finding"] for it in probe if not it["covid"])), "variants": {}}
    for name, (model_file, cbam) in VARIANTS.items():
        if not (bundle / "models" / model_file).is_file():
            result["variants"][name] = {"skipped": f"no models/{model_file}"}
            continue
        p = dict(zip(images, predict_covid(bundle, model_file, cbam, [str(cxr / i) for i in images])))
        y_test = np.array([it["label"] == covid for it in test], dtype=int)
        y_probe = np.array([it["covid"] for it in probe], dtype=int)
        neg = [it for it in probe if not it["covid"]]
        result["variants"][name] = {
            "model_file": f"models/{model_file}",
            "model_sha256": weights_hash(bundle / "models" / model_file),
            "test_split": binary_summary(y_test, np.array([p[it["image"]] for it in test]),
                                         [it["patient"] for it in test]),
            "adult_probe": binary_summary(y_probe, np.array([p[it["image"]] for it in probe]),
                                          [it["patient"] for it in probe]),
            "adult_not_covid19_called_covid19_by_group": {
                g: f"{sum(p[it['image']] >= 0.5 for it in neg if it['group'] == g)}/"
                   f"{sum(it['group'] == g for it in neg)}" for g in sorted({it["group"] for it in neg})
            },
            "adult_probe_per_image": [
                {"image": it["image"], "patient": it["patient"], "finding": it["finding"],
                 "p_covid19": round(float(p[it["image"]]), 4)} for it in probe
            ],
        }
    write_json_atomic(result, Path(args.out))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "adult_probe_per_image"}
                      for k, v in result["variants"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
