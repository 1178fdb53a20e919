"""Per-slice lung / non-lung decisions: the ResNeXt-50 slice filter vs the segmenter's lung-mask area.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ct_lung_slice_filter_eval.py \
        --filter_ckpt runs/ct_lung_slice_filter/model.pt --spatial_size 112 112

For every scan of the slice-filter datalist's ``test`` split (MedSeg ``rp6``, ``rp8``: display values, held
out; TotalSegmentator ``example_ct_sm``: HU, reference = lobes 10-14) the reference slice label is
"mask covers >= 1 % of the slice". Both deciders are scored against it: the filter (bundle inference
components, lung probability >= 0.5) and the segmenter (shipped ``ct_lung_segmentation`` weights,
predicted mask area >= 1 %, what the pipeline uses when the filter has no weights). The unlabelled HU
DICOM series (COVID-CT-MD ``normal002``) gets the agreement of the two deciders and of each with the
threshold + connected-components HU reference.

Writes ``benchmarks/results/ct_lung_slice_filter.json`` atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FILTER = ROOT / "bundles" / "ct_lung_slice_filter"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ct_lung_segmentation_eval import BundleSegmenter  # noqa: E402  (sibling benchmark script)


class BundleSliceFilter:
    """The filter bundle's inference preprocessing + SliceClassifierInferer + softmax, in-process."""

    def __init__(self, ckpt_path: str, spatial_size: list[int]) -> None:
        from monai.bundle import ConfigParser

        p = ConfigParser()
        p.read_config(str(FILTER / "configs" / "inference.json"))
        p.update({"ckpt_path": ckpt_path, "spatial_size": spatial_size})
        self.device = p.get_parsed_content("device")
        self.network = p.get_parsed_content("network")
        self.network.load_state_dict(torch.load(ckpt_path, map_location=self.device, weights_only=True))
        self.network.eval()
        self.pre = p.get_parsed_content("preprocessing")
        self.inferer = p.get_parsed_content("inferer")

    def __call__(self, path: str) -> np.ndarray:
        """(Z,) lung probability per slice."""
        img = self.pre({"image": path})["image"][None].to(self.device)
        with torch.inference_mode():
            return torch.softmax(self.inferer(img, self.network), dim=1)[0, 1].cpu().numpy()


def scores(pred: np.ndarray, ref: np.ndarray) -> dict:
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    tp, tn, fp, fn = int((p & r).sum()), int((~p & ~r).sum()), int((p & ~r).sum()), int((~p & r).sum())
    return {
        "accuracy": round((tp + tn) / len(p), 4),
        "sensitivity": round(tp / (tp + fn), 4) if tp + fn else None,
        "specificity": round(tn / (tn + fp), 4) if tn + fp else None,
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }


def area_decision(mask: np.ndarray, min_area: float) -> np.ndarray:
    from ctcovid.transforms import LungSlicesFromMask

    return LungSlicesFromMask(min_area=min_area)(torch.as_tensor(mask)[None]).numpy().astype(bool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filter_ckpt", required=True)
    ap.add_argument("--spatial_size", type=int, nargs=2, default=[224, 224])
    ap.add_argument(
        "--seg_ckpt", default=str(ROOT / "bundles" / "ct_lung_segmentation" / "models" / "model.pt")
    )
    ap.add_argument("--min_area", type=float, default=0.01)
    ap.add_argument(
        "--training_log", default=None, help="metrics.csv of the filter training, copied into the results"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ct_lung_slice_filter.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from ctcovid.io import load_ct
    from ctcovid.training import binarize_label, load_lung_datalist, threshold_lung_mask

    filt = BundleSliceFilter(args.filter_ckpt, list(args.spatial_size))
    seg = BundleSegmenter(args.seg_ckpt)
    datalist = FILTER / "configs" / "datalist.json"
    res: dict = {
        "filter_checkpoint": os.path.relpath(args.filter_ckpt, ROOT),
        "filter_input_size": list(args.spatial_size),
        "segmenter_checkpoint": os.path.relpath(args.seg_ckpt, ROOT),
        "lung_slice_rule": f"mask area >= {args.min_area:g} of the slice",
        "machine": {
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "load_avg": os.getloadavg(),
        },
        "scans": {},
    }
    all_ref, all_f, all_s = [], [], []
    for it in load_lung_datalist(datalist, "test"):
        lab = torch.as_tensor(np.asarray(load_ct(it["label"]))[0])
        ref = area_decision(binarize_label(lab, it.get("label_values")).numpy(), args.min_area)
        t0 = time.process_time()
        prob = filt(it["image"])
        t_filter = time.process_time() - t0
        t0 = time.process_time()
        mask, _ = seg(it["image"])
        t_seg = time.process_time() - t0
        f_dec, s_dec = prob >= 0.5, area_decision(mask, args.min_area)
        all_ref.append(ref), all_f.append(f_dec), all_s.append(s_dec)
        res["scans"][it["case"]] = {
            "domain": it.get("domain"),
            "slices": int(len(ref)),
            "lung_slices": int(ref.sum()),
            "slice_filter": scores(f_dec, ref),
            "segmenter_mask_area": scores(s_dec, ref),
            "agreement_filter_vs_mask_area": round(float((f_dec == s_dec).mean()), 4),
            "cpu_s": {"slice_filter": round(t_filter, 2), "segmenter": round(t_seg, 2)},
        }
    ref, f_dec, s_dec = (np.concatenate(a) for a in (all_ref, all_f, all_s))
    res["all_labelled_test_slices"] = {
        "slices": int(len(ref)),
        "slice_filter": scores(f_dec, ref),
        "segmenter_mask_area": scores(s_dec, ref),
        "agreement_filter_vs_mask_area": round(float((f_dec == s_dec).mean()), 4),
    }

    # unlabelled HU DICOM: agreement only (threshold reference is a sanity check, not ground truth)
    nd = load_lung_datalist(datalist, "test_unlabelled")[0]
    prob = filt(nd["image"])
    mask, _ = seg(nd["image"])
    thr = area_decision(threshold_lung_mask(np.asarray(load_ct(nd["image"]))[0]), args.min_area)
    f_dec, s_dec = prob >= 0.5, area_decision(mask, args.min_area)
    res["unlabelled_hu_dicom_normal002"] = {
        "slices": int(len(prob)),
        "lung_slices_filter": int(f_dec.sum()),
        "lung_slices_mask_area": int(s_dec.sum()),
        "lung_slices_threshold_reference": int(thr.sum()),
        "agreement_filter_vs_mask_area": round(float((f_dec == s_dec).mean()), 4),
        "filter_vs_threshold_reference": scores(f_dec, thr),
        "mask_area_vs_threshold_reference": scores(s_dec, thr),
    }
    if args.training_log and Path(args.training_log).is_file():
        import csv

        with open(args.training_log, newline="") as f:
            res["training_validation_log"] = list(csv.DictReader(f))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
