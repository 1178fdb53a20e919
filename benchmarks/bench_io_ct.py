"""Time ``ctcovid.io.load_ct`` on the real CT data (and MONAI ``LoadImage`` on the same DICOM series).

Usage::

    .venv/bin/python benchmarks/bench_io_ct.py [--repeats 3] [--with-monai]

Writes ``benchmarks/results/io_ct.json`` (atomically). Times are medians of ``repeats`` runs after one
warm-up read (file cache warm), wall-clock and process CPU; the machine load is recorded since shared
machines vary (on a busy machine the CPU time is the more comparable number).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CTCOVID_DATA", ROOT.parent / "shared" / "data")).resolve()

CASES = {
    "covid_ct_md_normal002_dicom_jpeg_lossless_167": DATA / "ct" / "covid_ct_md" / "normal002",
    "totalseg_dicom_jpeg2000_20": DATA / "fixtures" / "totalsegmentator_example_ct" / "example_ct_dicom",
    "totalseg_nifti_112": DATA / "fixtures" / "totalsegmentator_example_ct" / "example_ct.nii.gz",
    "medseg_rp2_nifti_39": DATA / "ct" / "medseg" / "images" / "rp2.nii.gz",
}


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds); CPU time is the fairer number on a busy machine."""
    fn()  # warm-up: file cache, lazy imports
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--with-monai", action="store_true", help="also time MONAI LoadImage (ITKReader) on DICOM"
    )
    args = parser.parse_args()
    logging.getLogger("pydicom").setLevel(logging.ERROR)

    from ctcovid.io import load_ct

    results: dict[str, dict] = {}
    for name, path in CASES.items():
        if not path.exists():
            print(f"skip {name}: {path} missing")
            continue
        entry = {"path": str(path.relative_to(DATA))}
        backends = ("sitk", "pydicom") if path.is_dir() else ("auto",)
        for backend in backends:
            wall, cpu = _median_time(lambda p=path, b=backend: load_ct(p, backend=b), args.repeats)
            entry[f"load_ct_{backend}_wall_s"], entry[f"load_ct_{backend}_cpu_s"] = (
                round(wall, 3),
                round(cpu, 3),
            )
        if args.with_monai and path.is_dir():
            from monai.transforms import LoadImage

            loader = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)
            wall, cpu = _median_time(lambda p=path, f=loader: f(str(p)), args.repeats)
            entry["monai_loadimage_itk_wall_s"], entry["monai_loadimage_itk_cpu_s"] = (
                round(wall, 3),
                round(cpu, 3),
            )
        results[name] = entry
        print(name, entry)

    out = {
        "benchmark": "ctcovid.io.load_ct read time (median wall-clock and process-CPU seconds, warm file cache)",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_1min": os.getloadavg()[0],
        },
        "repeats": args.repeats,
        "results": results,
    }
    dest = ROOT / "benchmarks" / "results" / "io_ct.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=dest.parent, suffix=".tmp", delete=False) as f:
        json.dump(out, f, indent=2)
    os.replace(f.name, dest)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
