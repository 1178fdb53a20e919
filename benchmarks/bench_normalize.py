"""Time CT intensity normalisation against the voxel count, HU and display-valued (issue 16, item 8).

Usage::

    .venv/bin/python benchmarks/bench_normalize.py [--repeats 3]

Volumes: COVID-CT-MD ``normal002`` (512x512x167, HU) and the same scan as display values (HU + 1024 clipped
to 0..4095, the MedSeg convention) stacked along z to 167, 334 and 418 slices, so the voxel count grows and
nothing else does. Each is normalised by :class:`ctcovid.transforms.NormalizeCTIntensity` as the pipeline
does (median of ``repeats`` after a warm-up), and display volumes also with exact percentiles (every voxel:
the behaviour before the random-sample estimate). Writes ``benchmarks/results/ct_normalize.json``
(atomically) with seconds and nanoseconds per voxel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CTCOVID_DATA", ROOT.parent / "shared" / "data")).resolve()


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from common import save_result
    from monai.data import MetaTensor

    from ctcovid.io import load_ct
    from ctcovid.transforms import NormalizeCTIntensity, RobustDisplayScaling

    hu = load_ct(DATA / "ct" / "covid_ct_md" / "normal002")
    display_167 = torch.clamp(hu.as_tensor() + 1024, 0, 4095)
    rows = []

    def record(name: str, volume: torch.Tensor, domain: str, exact: bool) -> None:
        img = MetaTensor(volume.contiguous(), meta={"intensity_domain": domain})
        norm = NormalizeCTIntensity()
        if exact:
            norm.display_scaling.max_samples = img.numel()  # every voxel: exact percentiles
        seconds = _median_s(lambda: norm(img), args.repeats)
        rows.append({"volume": name, "domain": domain, "shape": list(img.shape[1:]), "exact_percentiles": exact,
                     "seconds": round(seconds, 4), "ns_per_voxel": round(1e9 * seconds / img.numel(), 2)})
        print(rows[-1], flush=True)

    record("normal002", hu.as_tensor(), "hu", exact=False)
    for slices in (167, 334, 418):
        reps = -(-slices // 167)
        volume = display_167.repeat(1, 1, 1, reps)[..., :slices]
        for exact in (False, True):
            record(f"normal002_display_{slices}", volume, "display", exact)
    save_result(
        "ct_normalize.json",
        "NormalizeCTIntensity seconds against the voxel count (median of repeats after a warm-up)",
        torch_threads=torch.get_num_threads(),
        max_samples=RobustDisplayScaling.max_samples,
        repeats=args.repeats,
        results=rows,
    )

if __name__ == "__main__":
    main()
