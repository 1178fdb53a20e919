"""Measure an X-ray lung segmenter (bundle ``cxr_lung_segmentation``) on its held-out test split; write the numbers.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/cxr_lung_segmentation_eval.py [--ckpt_path PATH]
        [--channels 16,32,64,128,256 --num_res_units 2] [--out JSON] [--montage PNG]

Every image runs once through the bundle's own ``train.json`` + ``evaluate.json`` components (preprocessing,
network, post-processing with the resize inverted, clean-up off); each post-processing variant then applies
the bundle's clean-up (:func:`ctcovid.cxr.masks.lung_mask_cleanup`, the same MONAI transforms) to that arg-max:

- ``argmax``: the raw arg-max;
- ``keep2``: plus the two largest lung components (``keep_components``);
- ``keep2_fill``: plus hole filling (``fill_holes``), the bundle's default.

Per variant, on the 59 test images (31 patients never seen in training), in the original image size:

- Dice of the lung label (mean, median, sd, min, 10th percentile, images below 0.85);
- **dropped lungs**: reference lungs (the reference mask's two largest components, left and right) of which the
  prediction covers less than half -- a consolidated lung left out;
- **spill below the diaphragm**: predicted lung pixels more than 5 % of the image height below the reference
  lungs' lowest row, as a share of the reference lung area (mean, and images with more than 1 %).

``--montage`` draws the worst images (reference green, prediction red) for a person to look at; the
images are ieee8023's and not redistributable, so the picture is not committed. Writes
``benchmarks/results/cxr_lung_segmentation.json`` atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "cxr_lung_segmentation" / "configs"
VARIANTS = {"argmax": (0, False), "keep2": (2, False), "keep2_fill": (2, True)}
SPILL_MARGIN = 0.05  # of the image height: below the reference lungs by more than this counts as spill


def lung_measures(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Dice, covered share of each reference lung and below-diaphragm spill of one binary 2D prediction."""
    inter = np.logical_and(pred, ref).sum()
    dice = 2.0 * inter / max(pred.sum() + ref.sum(), 1)
    labels, n = ndimage.label(ref)
    sizes = np.bincount(labels.ravel())[1:]
    lungs = np.argsort(sizes)[::-1][:2] + 1 if n else []
    covered = [float(pred[labels == k].mean()) for k in lungs]
    rows = np.nonzero(ref.any(axis=1))[0]
    floor = rows.max() + int(SPILL_MARGIN * ref.shape[0]) if rows.size else ref.shape[0]
    spill = pred[floor + 1 :].sum() / max(ref.sum(), 1)
    return {"dice": float(dice), "lung_covered": covered, "spill": float(spill)}


def raw_masks(ckpt_path: str, overrides: dict) -> tuple[list[dict], list[tuple[np.ndarray, np.ndarray]]]:
    """The test items and, per image, the raw arg-max lung mask in the original size and the reference: the
    bundle's evaluate post-processing with its clean-up switched off (the network runs once per image)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    parser.update({"ckpt_path": ckpt_path, "keep_components": 0, "fill_holes": False, **overrides})
    items = parser.get_parsed_content("test_data")
    pre = parser.get_parsed_content("validate#preprocessing")
    post = parser.get_parsed_content("validate#postprocessing")
    net = parser.get_parsed_content("network")
    net.load_state_dict({k: v.float() for k, v in torch.load(ckpt_path, map_location="cpu").items()})
    net.eval()
    masks = []
    for item in items:
        d = pre(dict(item))
        with torch.no_grad():
            d["pred"] = net(d["image"][None].float())[0]
        d = post(d)
        masks.append((np.asarray(d["pred"][1]) > 0.5, np.asarray(d["label"][1]) > 0.5))
    return items, masks


def run_variant(items: list[dict], raw: list[tuple], keep: int, fill: bool) -> tuple[list[dict], list[tuple]]:
    """Measures of every test image after the bundle's clean-up (``keep`` components, ``fill`` holes)."""
    from ctcovid.cxr.masks import lung_mask_cleanup

    clean = lung_mask_cleanup(keep, fill)
    rows, masks = [], []
    for item, (argmax, ref) in zip(items, raw):
        pred = np.asarray(clean(torch.as_tensor(argmax[None].astype(np.int64))))[0] > 0
        rows.append({"image": Path(item["image"]).name, "patient": item["patient"], **lung_measures(pred, ref)})
        masks.append((pred, ref))
    return rows, masks


def summarise(rows: list[dict]) -> dict:
    dice = [r["dice"] for r in rows]
    covered = [c for r in rows for c in r["lung_covered"]]
    spill = [r["spill"] for r in rows]
    return {
        "images": len(rows),
        "patients": len({r["patient"] for r in rows}),
        "dice_mean": round(statistics.mean(dice), 4),
        "dice_median": round(statistics.median(dice), 4),
        "dice_sd": round(statistics.pstdev(dice), 4),
        "dice_min": round(min(dice), 4),
        "dice_p10": round(float(np.percentile(dice, 10)), 4),
        "images_dice_below_0.85": sum(x < 0.85 for x in dice),
        "reference_lungs": len(covered),
        "dropped_lungs": sum(c < 0.5 for c in covered),
        "spill_mean_percent": round(100 * statistics.mean(spill), 3),
        "images_spill_above_1_percent": sum(s > 0.01 for s in spill),
    }


def draw_montage(rows: list[dict], masks: list[tuple], items: list[dict], path: Path, n: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctcovid.io import load_xray

    worst = np.argsort([r["dice"] for r in rows])[:n]
    fig, axes = plt.subplots(2, (n + 1) // 2, figsize=(4 * ((n + 1) // 2), 8))
    for ax, i in zip(axes.ravel(), worst):
        img = np.asarray(load_xray(items[i]["image"]))[0]
        pred, ref = masks[i]
        ax.imshow(img, cmap="gray")
        ax.contour(ref, levels=[0.5], colors="lime", linewidths=1)
        ax.contour(pred, levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"{rows[i]['image'][:28]}\nDice {rows[i]['dice']:.3f}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt_path", default=str(ROOT / "bundles" / "cxr_lung_segmentation" / "models" / "model.pt"))
    ap.add_argument("--channels", default=None, help="U-Net channels, comma-separated (default: the config's)")
    ap.add_argument("--num_res_units", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cxr_lung_segmentation.json"))
    ap.add_argument("--montage", default=None, help="PNG of the worst images (keep it out of the repository)")
    args = ap.parse_args()
    overrides = {}
    if args.channels:
        overrides["unet_def#channels"] = [int(c) for c in args.channels.split(",")]
    if args.num_res_units is not None:
        overrides["unet_def#num_res_units"] = args.num_res_units
    result = {"checkpoint": os.path.relpath(args.ckpt_path, ROOT), "network_overrides": overrides, "variants": {}}
    t0 = time.perf_counter()
    items, raw = raw_masks(args.ckpt_path, overrides)
    result["inference_wall_s"] = round(time.perf_counter() - t0, 1)
    for name, (keep, fill) in VARIANTS.items():
        rows, masks = run_variant(items, raw, keep, fill)
        result["variants"][name] = summarise(rows)
        print(name, json.dumps(result["variants"][name]), flush=True)
    result["per_image_keep2_fill"] = rows
    result["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    if args.montage:
        draw_montage(rows, masks, items, Path(args.montage))


if __name__ == "__main__":
    main()
