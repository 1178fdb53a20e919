"""Would averaging several stage-1 weights beat one? Stage-1 probabilities of each bundle folder on one part of
stage 1's Kermany datalist (default ``validation``: candidates are compared without opening the test part), and
of the mean of every combination of two or more of them (issue 18).

Each ``--member NAME=FOLDER`` is a folder holding a ``cxr_pneumonia_type_classification`` bundle (with its
``cxr_lung_segmentation`` beside it when the weights were trained on lung-box crops); the stage is loaded as the
cascade loads it (``CXRStage.from_bundle``: the crop overlay is stacked for such weights), so every member sees
the film as it would in ``ctcovid cxr predict``. Scores: accuracy, macro-F1 (scikit-learn) and macro one-vs-rest
ROC AUC of the arg-max / probabilities.

    python benchmarks/cxr_stage1_ensemble.py --member shipped=bundles --member step5=/tmp/step5/bundles \
        [--out benchmarks/results/cxr_stage1_ensemble.json]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and macro one-vs-rest AUC of ``probs`` ``(N, C)`` against integer ``labels``."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    pred = probs.argmax(axis=1)
    return {
        "accuracy": round(float(accuracy_score(labels, pred)), 4),
        "macro_f1": round(float(f1_score(labels, pred, average="macro")), 4),
        "macro_auc": round(float(roc_auc_score(labels, probs, multi_class="ovr", average="macro")), 4),
    }


def combinations(probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every member alone and the mean probabilities of every combination of two or more, keyed ``a+b+...``."""
    names = list(probs)
    return {
        "+".join(combo): np.mean([probs[n] for n in combo], axis=0)
        for k in range(1, len(names) + 1)
        for combo in itertools.combinations(names, k)
    }


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from common import write_result_file

    from ctcovid.cxr.cascade import STAGE1_BUNDLE
    from ctcovid.cxr.datalists import load_datalist
    from ctcovid.cxr.stage import CXRStage
    from ctcovid.io import load_xray
    from ctcovid.profiling import describe_machine
    from ctcovid.training.data_root import default_data_root

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=default_data_root(), help="shared data folder (default: $CTCOVID_DATA or ../shared/data)")
    p.add_argument("--member", action="append", required=True, help="NAME=FOLDER holding the stage-1 bundle (repeat)")
    p.add_argument("--part", default="validation")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cxr_stage1_ensemble.json"))
    args = p.parse_args(argv)
    members: dict[str, str] = {}
    for m in args.member:
        name, sep, folder = m.partition("=")
        if not (sep and name and folder) or name in members:
            p.error(f"--member {m!r}: need NAME=FOLDER with a name not used before")
        members[name] = folder
    if len(members) < 2:
        p.error("give at least two --member NAME=FOLDER")

    items = load_datalist(ROOT / "bundles" / STAGE1_BUNDLE / "configs" / "datalist.json", args.part,
                          Path(args.data) / "cxr" / "kermany")
    labels = np.array([it["label"] for it in items])
    probs, models = {}, {}
    for name, folder in members.items():
        stage = CXRStage.from_bundle("stage 1", STAGE1_BUNDLE, Path(folder), "cpu")
        rows = []
        for it in items:
            x, _ = stage.prepare(load_xray(it["image"]))
            rows.append(stage.probabilities(x).reshape(-1))
        probs[name] = np.stack(rows)
        models[name] = stage.provenance
        print(f"{name}: {len(rows)} films", flush=True)
    result = {
        "what": f"stage-1 probabilities averaged over weights, Kermany {args.part} part ({len(items)} films)",
        "scores": {name: scores(labels, pr) for name, pr in combinations(probs).items()},
        "models": models,
        "machine": describe_machine("cpu"),
        "date": time.strftime("%Y-%m-%d"),
    }
    write_result_file(result, args.out, hide=("models", "machine"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
