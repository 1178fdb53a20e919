"""How close the lesion model's input for a MedSeg slice comes to the Ma et al. PNG of the same slice.

Usage::

    .venv/bin/python benchmarks/ct_infection_clahe_match.py [--out benchmarks/results/ct_infection_clahe_match.json]

86 % of the lesion model's training slices are Ma et al. PNGs, equalised (CLAHE) by the copying repository;
at inference every CT slice is equalised by ``ctcovid`` (``clahe_clip_limit`` of the bundle). 59 Ma PNGs are
copies of ``ct/medseg`` slices (``medseg_copies.csv``), so the two preparations of one slice can be compared
directly. This uses only the copies of the *training* volumes (``rp2``, ``rp6``) and only intensities, never
the lesion masks: a clip limit chosen here does not look at held-out data.

Per clip limit: mean absolute difference to the PNG (whole slice and inside the reference lung mask), Pearson
correlation, and the mean difference inside the lung (bias). The input is built as the lesion model's training and
the pipeline build it (:func:`ctcovid.training.lung_slice_items`: whole-volume 0.5 / 99.5 percentile scaling of
display values, bilinear resize to 256 x 256), then :class:`ctcovid.transforms.CLAHE`. Writes the JSON atomically.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLIP_LIMITS = (None, 0.01, 0.02, 0.025, 0.03, 0.035, 0.04, 0.05, 0.07)
TRAINING_VOLUMES = ("rp2", "rp6")


def _ma_png_on_medseg_grid(path: Path) -> np.ndarray:
    """The PNG in [0, 1], oriented as ``medseg[:, :, k]`` (the csv's ``flipud`` then the transpose)."""
    from PIL import Image

    png = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    return np.flipud(png).T.copy()


def main() -> None:
    from ctcovid.io.atomic import write_json_atomic
    from ctcovid.profiling import describe_machine
    from ctcovid.training.data_root import default_data_root
    from ctcovid.training.slices import lung_slice_items
    from ctcovid.transforms import CLAHE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ct_infection_clahe_match.json"))
    parser.add_argument("--data_root", default=default_data_root())
    args = parser.parse_args()
    data = Path(args.data_root) / "ct"
    copies_csv = data / "ma2020_slices" / "medseg_copies.csv"
    if not copies_csv.is_file():
        sys.exit(f"{copies_csv}: not found (the shared data is needed)")
    with open(copies_csv, newline="", encoding="utf-8") as f:
        copies = [r for r in csv.DictReader(f) if r["volume"] in TRAINING_VOLUMES]

    equalisers = {clip: CLAHE(clip_limit=clip) for clip in CLIP_LIMITS if clip is not None}
    scores: dict[str, list[tuple[float, float, float, float]]] = {str(c): [] for c in CLIP_LIMITS}
    for volume in TRAINING_VOLUMES:
        # the lesion model's own slice preparation (normalised, resized; label = the resized lung mask)
        item = {"image": data / "medseg" / "images" / f"{volume}.nii.gz"}
        item["label"] = data / "medseg" / "lung_masks" / f"{volume}.nii.gz"
        by_slice = {s["slice"]: s for s in lung_slice_items([item])}
        for row in (r for r in copies if r["volume"] == volume):
            sample = by_slice[int(row["slice_index"])]
            ma = _ma_png_on_medseg_grid(data / "ma2020_slices" / "ct" / row["ma_file"])
            x = sample["image"]  # (1, 256, 256) in [0, 1]
            in_lung = sample["label"][0].numpy() > 0.5
            for clip in CLIP_LIMITS:
                y = (x if clip is None else equalisers[clip](x))[0].numpy()
                diff = np.abs(y - ma)
                corr = float(np.corrcoef(y.ravel(), ma.ravel())[0, 1])
                bias = float(y[in_lung].mean() - ma[in_lung].mean())
                scores[str(clip)].append((float(diff.mean()), float(diff[in_lung].mean()), corr, bias))

    rows = {}
    for clip, vals in scores.items():
        v = np.asarray(vals)
        rows["no CLAHE" if clip == "None" else clip] = {
            "mean_abs_diff": round(float(v[:, 0].mean()), 4),
            "mean_abs_diff_lung": round(float(v[:, 1].mean()), 4),
            "pearson_r": round(float(v[:, 2].mean()), 4),
            "lung_bias": round(float(v[:, 3].mean()), 4),
        }
    best = min((k for k in rows if k != "no CLAHE"), key=lambda k: rows[k]["mean_abs_diff_lung"])
    result = {
        "benchmark": "lesion model input (ctcovid CLAHE per clip limit) vs the Ma et al. PNG of the same slice",
        "command": "benchmarks/ct_infection_clahe_match.py",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": describe_machine("cpu"),
        "pairs": len(next(iter(scores.values()))),
        "volumes": list(TRAINING_VOLUMES),
        "by_clip_limit": rows,
        "closest_in_lung": best,
    }
    write_json_atomic(result, args.out)
    for clip, r in rows.items():
        print(f"{clip:>9}: {r}")
    print(f"closest inside the lung: clip {best}; written {args.out}")


if __name__ == "__main__":
    main()
