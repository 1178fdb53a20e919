"""Where stage 1 looks: the share of its Grad-CAM evidence that lies inside the lungs (issue 18, regional learning).

For every image of one part of stage 1's Kermany datalist (default ``validation``: candidates are compared
without opening the test part), Grad-CAM of the predicted class at the
network's ``gradcam_layer`` (the cascade's own map), and the lung mask the X-ray lung segmenter predicts for the
same image (cached under ``--mask-root``). Recorded per image and summarised:

- ``lung_share``: sum of the map inside the lungs / sum of the map (1 = all evidence in the lungs);
- ``lung_area``: the lungs' share of the image -- what ``lung_share`` would be for a map spread evenly;
- ``peak_in_lung``: whether the map's hottest pixel lies in the lungs.

Regional learning (``train_regional.json``) trains on lung-only copies so that the network uses lung evidence;
this is the measure of whether it did. Weights trained on lung-box crops (``train_lungbox.json``) are measured
on the whole film too: their map is put back in the box, zero outside it. Masks are a segmenter's, not manual: read the numbers as a comparison
between weights on the same images, not as an absolute.

    python benchmarks/cxr_gradcam_lung_share.py [--bundles DIR] [--out benchmarks/results/cxr_gradcam_lung_share.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def share_in_lung(heat: np.ndarray, lung: np.ndarray) -> dict:
    """Grad-CAM map ``(H, W)`` in [0, 1] and a boolean lung mask of the same shape -> the three measures."""
    total = float(heat.sum())
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return {
        "lung_share": round(float(heat[lung].sum()) / total, 4) if total > 0 else None,
        "lung_area": round(float(lung.mean()), 4),
        "peak_in_lung": bool(lung[peak]) if total > 0 else None,
    }


def summarise(rows: list[dict]) -> dict:
    shares = [r["lung_share"] for r in rows if r["lung_share"] is not None]
    peaks = [r["peak_in_lung"] for r in rows if r["peak_in_lung"] is not None]
    return {
        "images": len(rows),
        "lung_share_mean": round(statistics.fmean(shares), 4) if shares else None,
        "lung_share_median": round(statistics.median(shares), 4) if shares else None,
        "lung_area_mean": round(statistics.fmean(r["lung_area"] for r in rows), 4) if rows else None,
        "peak_in_lung_fraction": round(sum(peaks) / len(peaks), 4) if peaks else None,
        "empty_maps": len(rows) - len(shares),
    }


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from common import write_result_file
    from PIL import Image

    from ctcovid.cxr.cascade import STAGE1_BUNDLE
    from ctcovid.cxr.datalists import load_datalist
    from ctcovid.cxr.masks import mask_path, predict_lung_masks
    from ctcovid.cxr.stage import CXRStage
    from ctcovid.io import load_xray
    from ctcovid.training.data_root import default_data_root
    from ctcovid.visualize.gradcam import gradcam_with_logits, paste_heatmap

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=default_data_root(), help="shared data folder (default: $CTCOVID_DATA or ../shared/data)")
    p.add_argument("--bundles", default=None, help="folder holding the stage-1 bundle (default: the repository's)")
    p.add_argument("--mask-root", default=str(Path("~/.cache/ctcovid-train/masks/kermany").expanduser()))
    p.add_argument("--part", default="validation")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cxr_gradcam_lung_share.json"))
    args = p.parse_args(argv)

    items = load_datalist(ROOT / "bundles" / STAGE1_BUNDLE / "configs" / "datalist.json", args.part,
                          Path(args.data) / "cxr" / "kermany")
    predict_lung_masks(items, args.mask_root)  # cached: only missing masks are computed
    bundles = Path(args.bundles) if args.bundles else ROOT / "bundles"
    stage = CXRStage.from_bundle("stage 1", STAGE1_BUNDLE, bundles, "cpu")
    rows = []
    for it in items:
        image = load_xray(it["image"])
        x, box = stage.prepare(image)
        heat, logits = gradcam_with_logits(stage.network, x, stage.gradcam_layer)
        if box is not None:  # weights trained on lung-box crops: the map goes back on the whole film, 0 outside
            heat = paste_heatmap(heat, box, image.shape[1:])
        with Image.open(mask_path(args.mask_root, it["name"])) as m:  # image size -> the map's size
            lung = np.asarray(m.convert("L").resize(heat.shape[::-1], Image.NEAREST)) > 127
        pred = int(logits.argmax())
        rows.append({"image": it["name"], "label": stage.class_names[it["label"]],
                     "predicted": stage.class_names[pred], **share_in_lung(heat, lung)})
    result = {
        "what": f"stage-1 Grad-CAM (predicted class, layer {stage.gradcam_layer}) inside segmenter lung masks, "
                f"Kermany {args.part} part",
        "all": summarise(rows),
        "by_true_class": {c: summarise([r for r in rows if r["label"] == c]) for c in stage.class_names},
        "accuracy": round(sum(r["label"] == r["predicted"] for r in rows) / len(rows), 4),
        "model": stage.provenance,
        "date": time.strftime("%Y-%m-%d"),
        "per_image": rows,
    }
    write_result_file(result, args.out, hide=("model", "per_image"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
