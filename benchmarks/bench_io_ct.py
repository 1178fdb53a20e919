"""Time ``ctcovid.io.load_ct`` on the real CT data against a plain SimpleITK series read (and MONAI ``LoadImage``).

Usage::

    .venv/bin/python benchmarks/bench_io_ct.py [--repeats 7] [--with-monai]

Writes ``benchmarks/results/io_ct.json`` (atomically). For a DICOM folder the readers are timed in turns
(one read of each per round, ``repeats`` rounds after a warm-up round, file cache warm), so drifting machine
load hits them alike; times are medians, wall-clock and process CPU. The baseline is what a SimpleITK user
writes: ``GetGDCMSeriesFileNames`` + ``ImageSeriesReader.Execute`` + ``GetArrayFromImage`` (no checks, the
stored type). ``load_ct`` does more: every header read and checked (series choice, geometry), float32 HU in
(X, Y, Z) C order; ``ratio_load_ct_to_plain_sitk`` is its wall time over the baseline's.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
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


def _median_times(fns: dict, repeats: int) -> dict[str, float]:
    """``{name}_wall_s`` / ``{name}_cpu_s`` medians, timing the functions in turns (one call each per round)."""
    for fn in fns.values():
        fn()  # warm-up: file cache, lazy imports
    walls: dict[str, list[float]] = {n: [] for n in fns}
    cpus: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            walls[name].append(time.perf_counter() - w0)
            cpus[name].append(time.process_time() - c0)
    out = {}
    for name in fns:
        out[f"{name}_wall_s"] = round(statistics.median(walls[name]), 3)
        out[f"{name}_cpu_s"] = round(statistics.median(cpus[name]), 3)
    return out


def _plain_sitk_read(folder: Path):
    """A plain SimpleITK series read, as its documentation shows it."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--with-monai", action="store_true", help="also time MONAI LoadImage (ITKReader) on DICOM"
    )
    args = parser.parse_args()
    logging.getLogger("pydicom").setLevel(logging.ERROR)

    from common import save_result

    from ctcovid.io import load_ct

    results: dict[str, dict] = {}
    for name, path in CASES.items():
        if not path.exists():
            print(f"skip {name}: {path} missing")
            continue
        entry = {"path": str(path.relative_to(DATA))}
        if not path.is_dir():
            entry.update(_median_times({"load_ct_auto": lambda p=path: load_ct(p)}, args.repeats))
            results[name] = entry
            print(name, entry)
            continue
        fns = {
            "plain_sitk": lambda p=path: _plain_sitk_read(p),
            "load_ct_sitk": lambda p=path: load_ct(p, backend="sitk"),
            "load_ct_pydicom": lambda p=path: load_ct(p, backend="pydicom"),
        }
        if args.with_monai:
            from monai.transforms import LoadImage

            loader = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)
            fns["monai_loadimage_itk"] = lambda p=path, f=loader: f(str(p))
        entry.update(_median_times(fns, args.repeats))
        entry["ratio_load_ct_to_plain_sitk"] = round(entry["load_ct_sitk_wall_s"] / entry["plain_sitk_wall_s"], 2)
        results[name] = entry
        print(name, entry)

    save_result(
        "io_ct.json",
        "ctcovid.io.load_ct read time (median wall-clock and process-CPU seconds, warm file cache)",
        repeats=args.repeats,
        results=results,
    )

if __name__ == "__main__":
    main()
