"""Measure the shipped ``ct_lung_segmentation`` model on every intensity domain; write the numbers.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ct_lung_segmentation_eval.py [--ckpt_path PATH] [--out JSON]

What it measures (all on data the segmenter never trained on):

- **display 0-4095** (MedSeg ``rp6``, ``rp8``, the held-out volumes): per-volume 3D Dice and HD95 in mm,
  by running the bundle's ``train.json`` + ``evaluate.json`` evaluator (the same numbers
  ``python -m monai.bundle run --config_file "['train.json','evaluate.json']"`` logs), plus per-slice
  lung/non-lung decisions from the predicted mask area (>= 1 % of the slice) against the reference.
- **HU NIfTI** (TotalSegmentator ``example_ct_sm``): Dice and HD95 against lobes 10-14 merged (same evaluator).
- **HU DICOM** (COVID-CT-MD ``normal002``, no mask): lung volume in litres through the bundle's
  ``inference.json`` components, and Dice against a threshold + connected-components HU lung mask
  (:func:`ctcovid.training.threshold_lung_mask`, a sanity reference only).
- **8-bit CLAHE** (the 9 ma2020 slices copied from rp6/rp8, excluded from training and validation):
  per-slice 2D Dice at 256x256; the validation slices are reported too (they chose the checkpoint).
- time per volume (wall and process CPU; the machine is shared, CPU time is the steadier number).

Writes ``benchmarks/results/ct_lung_segmentation.json`` atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "ct_lung_segmentation"
CONFIGS = BUNDLE / "configs"


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, round(time.perf_counter() - w0, 2), round(time.process_time() - c0, 2)


def evaluate_split(split: str, ckpt_path: str, output_dir: str, keep_components: int = 2) -> list[dict]:
    """Per-volume Dice / HD95 of the bundle's evaluate config on ``split`` of the datalist."""
    from monai.bundle import ConfigParser

    from ctcovid.training import load_lung_datalist

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    parser.update(
        {"test_split": split, "ckpt_path": ckpt_path, "output_dir": output_dir, "keep_components": keep_components}
    )
    evaluator = parser.get_parsed_content("validate#evaluator")
    _, wall, cpu = _timed(evaluator.run)
    details = evaluator.state.metric_details
    items = load_lung_datalist(str(CONFIGS / "datalist.json"), split, labelled_only=True)
    rows = []
    for i, it in enumerate(items):
        rows.append(
            {
                "case": it["case"],
                "domain": it.get("domain"),
                "dice": round(float(details["test_mean_dice"][i].mean()), 4),
                "hd95_mm": round(float(details["test_hd95_mm"][i].mean()), 2),
            }
        )
    rows.append({"split_wall_s": wall, "split_cpu_s": cpu})
    return rows


class BundleSegmenter:
    """The bundle's inference preprocessing + SliceInferer + postprocessing (no file writing), in-process."""

    def __init__(self, ckpt_path: str, keep_components: int = 2) -> None:
        from monai.bundle import ConfigParser
        from monai.transforms import Compose

        p = ConfigParser()
        p.read_config(str(CONFIGS / "inference.json"))
        p.update({"ckpt_path": ckpt_path, "keep_components": keep_components})
        self.device = p.get_parsed_content("device")
        self.network = p.get_parsed_content("network")
        self.network.load_state_dict(torch.load(ckpt_path, map_location=self.device, weights_only=True))
        self.network.eval()
        self.pre = p.get_parsed_content("preprocessing")
        self.inferer = p.get_parsed_content("inferer")
        post = p.get_parsed_content("postprocessing").transforms
        self.post = Compose([t for t in post if type(t).__name__ != "SaveImaged"])

    def __call__(self, path: str) -> tuple[np.ndarray, torch.Tensor]:
        """-> (mask (X, Y, Z) uint8 in the input geometry, normalised input before resizing is not kept)."""
        from monai.data import decollate_batch, list_data_collate

        d = self.pre({"image": path})
        batch = list_data_collate([d])
        with torch.inference_mode():
            batch["pred"] = self.inferer(batch["image"].to(self.device), self.network)
        out = self.post(decollate_batch(batch)[0])
        return np.asarray(out["pred"][0], dtype=np.uint8), out["image"]


def slice_decisions(pred: np.ndarray, ref: np.ndarray, min_area: float = 0.01) -> dict:
    """Lung/non-lung per slice from the predicted mask area vs the reference mask area (both >= min_area)."""
    from ctcovid.transforms import LungSlicesFromMask

    dec = LungSlicesFromMask(min_area=min_area)
    p = dec(torch.as_tensor(pred)[None]).numpy().astype(bool)
    r = dec(torch.as_tensor(ref)[None]).numpy().astype(bool)
    tp, tn = int((p & r).sum()), int((~p & ~r).sum())
    fp, fn = int((p & ~r).sum()), int((~p & r).sum())
    return {
        "slices": int(len(p)),
        "lung_slices": int(r.sum()),
        "accuracy": round((tp + tn) / len(p), 4),
        "sensitivity": round(tp / (tp + fn), 4) if tp + fn else None,
        "specificity": round(tn / (tn + fp), 4) if tn + fp else None,
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt_path", default=str(BUNDLE / "models" / "model.pt"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ct_lung_segmentation.json"))
    ap.add_argument("--work_dir", default="/tmp/ct_lung_segmentation_eval")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from ctcovid.io import load_ct
    from ctcovid.training import (
        binarize_label,
        default_data_root,
        dice,
        load_lung_datalist,
        lung_slice_items,
        threshold_lung_mask,
    )

    datalist = str(CONFIGS / "datalist.json")
    res: dict = {
        "checkpoint": os.path.relpath(args.ckpt_path, ROOT),
        "checkpoint_bytes": os.path.getsize(args.ckpt_path),
        "machine": {
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "load_avg": os.getloadavg(),
        },
    }

    # display domain (held-out MedSeg volumes) and HU NIfTI vs TotalSegmentator lobes: the evaluate config
    # default post-processing keeps the 2 largest 3D lung components; keep_components=0 is the raw argmax
    for k in (2, 0):
        sfx = "" if k == 2 else "_raw_argmax"
        res["display_0_4095_heldout_medseg" + sfx] = evaluate_split("test", args.ckpt_path, f"{args.work_dir}/test{k}", k)
        res["hu_totalsegmentator_example_ct_sm" + sfx] = evaluate_split(
            "test_hu", args.ckpt_path, f"{args.work_dir}/test_hu{k}", k
        )

    seg = BundleSegmenter(args.ckpt_path)

    # slice decisions from the predicted mask area on the held-out volumes (+ timing per volume)
    res["slice_decision_from_mask_area"] = {}
    res["timing_per_volume"] = {}
    for it in load_lung_datalist(datalist, "test"):
        (pred, _), wall, cpu = _timed(lambda it=it: seg(it["image"]))
        ref = (np.asarray(load_ct(it["label"]))[0] > 0.5).astype(np.uint8)
        res["slice_decision_from_mask_area"][it["case"]] = slice_decisions(pred, ref)
        res["timing_per_volume"][it["case"]] = {"shape": list(pred.shape), "wall_s": wall, "cpu_s": cpu}

    # HU: TotalSegmentator crop, threshold reference vs lobes (how good is the sanity reference itself?)
    ts = load_lung_datalist(datalist, "test_hu", labelled_only=True)[0]
    hu = np.asarray(load_ct(ts["image"]))[0]
    lobes = (
        binarize_label(torch.as_tensor(np.asarray(load_ct(ts["label"]))[0]), ts["label_values"]).numpy() > 0
    )
    (pred_ts, _), wall, cpu = _timed(lambda: seg(ts["image"]))
    thr_ts = threshold_lung_mask(hu)
    res["hu_totalsegmentator_example_ct_sm_extra"] = {
        "dice_segmenter_vs_lobes": round(dice(pred_ts, lobes), 4),
        "dice_threshold_reference_vs_lobes": round(dice(thr_ts, lobes), 4),
        "dice_segmenter_vs_threshold_reference": round(dice(pred_ts, thr_ts), 4),
        "slice_decision_from_mask_area": slice_decisions(pred_ts, lobes.astype(np.uint8)),
        "wall_s": wall,
        "cpu_s": cpu,
    }

    # HU DICOM without mask: lung volume and agreement with the threshold reference
    nd = next(it for it in load_lung_datalist(datalist, "test_hu") if not it.get("label"))
    (pred_nd, img), wall, cpu = _timed(lambda: seg(nd["image"]))
    vol = load_ct(nd["image"])
    voxel_ml = float(np.prod(vol.meta["spacing"])) / 1000.0
    thr_nd = threshold_lung_mask(np.asarray(vol)[0])
    res["hu_dicom_covid_ct_md_normal002"] = {
        "shape": list(pred_nd.shape),
        "spacing_mm": [round(s, 4) for s in vol.meta["spacing"]],
        "lung_volume_l": round(float(pred_nd.sum()) * voxel_ml / 1000.0, 3),
        "threshold_reference_volume_l": round(float(thr_nd.sum()) * voxel_ml / 1000.0, 3),
        "dice_segmenter_vs_threshold_reference": round(dice(pred_nd, thr_nd), 4),
        "lung_slices_by_mask_area": int((pred_nd.reshape(-1, pred_nd.shape[2]).mean(0) >= 0.01).sum()),
        "wall_s": wall,
        "cpu_s": cpu,
    }

    # 8-bit CLAHE slices: the held-out copies of rp6/rp8, and the validation slices
    net, dev = seg.network, seg.device
    ex = json.loads(Path(datalist).read_text())["excluded"]
    data_root = Path(default_data_root())
    ex_items = [
        {
            "image": str(data_root / e["image"]),
            "label": str(data_root / e["image"].replace("/ct/", "/lungs/")),
            "case": e["group"],
        }
        for e in ex
    ]
    for name, items in (
        ("8bit_clahe_heldout_rp6_rp8_copies", ex_items),
        ("8bit_clahe_validation", load_lung_datalist(datalist, "validation")),
    ):
        sl = lung_slice_items(items, spatial_size=(256, 256))
        x = torch.stack([s["image"] for s in sl]).to(dev)
        with torch.inference_mode():
            pred = torch.cat([net(x[i : i + 16]).argmax(1) for i in range(0, len(x), 16)]).cpu().numpy()
        d = [dice(pred[i], sl[i]["label"][0].numpy() > 0.5) for i in range(len(sl))]
        res[name] = {
            "slices": len(sl),
            "mean_dice": round(float(np.mean(d)), 4),
            "min_dice": round(float(np.min(d)), 4),
            "per_slice": {
                f"{s['case']}:{Path(it['image']).name}": round(v, 4) for s, it, v in zip(sl, items, d)
            },
        }

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("8bit")}, indent=1))
    print(
        {
            k: {kk: vv for kk, vv in v.items() if kk != "per_slice"}
            for k, v in res.items()
            if k.startswith("8bit")
        }
    )


if __name__ == "__main__":
    main()
