"""Benchmark the CT pipeline per stage, against its compute floor and the paper-style baseline.

Usage (run by hand on a quiet machine; never part of the tests)::

    .venv/bin/python benchmarks/bench_ct_pipeline.py                       # CPU, fp32 + bf16, all scans
    .venv/bin/python benchmarks/bench_ct_pipeline.py --device cuda --out benchmarks/results/ct_pipeline_cuda.json
    .venv/bin/python benchmarks/bench_ct_pipeline.py --scans synthetic_300 --precisions fp32 --no-baseline

Scans: ``covid_ct_md_normal002`` (167-slice JPEG-lossless DICOM series, HU), ``medseg_rp6`` (MedSeg NIfTI,
display intensities) from ``../shared/data`` (or ``$CTCOVID_DATA``) when present, and ``synthetic_300``, a
300-slice 512x512 DICOM phantom written by :func:`common.write_synthetic_ct_series`. All four stages run
with the bundles' architectures at the paper's sizes; stages without shipped weights get random ones
(:func:`common.random_weight_bundles`: same FLOPs, meaningless outputs). The slice threshold is 0 so every
slice is kept (random slice-filter weights cannot select lung; volume building then works on all slices,
the most it ever does) and severity runs on every scan (``severity="always"``).

Each (scan, precision) is measured in a fresh child process so peak memory is that run's alone:
pipeline load, one warm-up run (oneDNN / cuDNN plan creation, file cache), then ``--repeats`` timed runs
(median per stage) with per-stage seconds and peak RSS (and CUDA memory), each scan handed straight to
the pipeline as ``ctcovid predict`` does (so it is freed once normalised), then each stage's networks
timed alone on the exact inputs the stage fed them, then (fp32 only, unless ``--no-baseline``) the
paper-style baseline of :mod:`ct_pipeline_baseline` in the same process, right after, on the same
weights loaded afresh without batch-norm folding (the paper's code runs its networks as trained). The parent measures
the machine's matmul throughput, sweeps batch sizes of the slice-level networks, and compares bf16 with
fp32 outputs. Results go to ``benchmarks/results/ct_pipeline.json`` (atomically).

The probes (stage inputs, networks alone, FLOPs, batch sweep, bf16 comparison) live in :mod:`ct_stage_probes`.

Floors: each stage's FLOPs (:func:`ctcovid.profiling.count_flops`: convolutions and matrix products, so a
lower bound of the work) divided by the matmul throughput measured here in the same precision.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray pretrained download fails at once

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
DATA = Path(os.environ.get("CTCOVID_DATA", ROOT.parent / "shared" / "data")).resolve()

REAL_SCANS = {
    "covid_ct_md_normal002": DATA / "ct" / "covid_ct_md" / "normal002",
    "medseg_rp6": DATA / "ct" / "medseg" / "images" / "rp6.nii.gz",
}
SYNTHETIC = "synthetic_300"
GIB = 2**30


def child(args) -> dict[str, Any]:
    """One (scan, precision) measurement; returns a JSON-ready dict."""
    import numpy as np
    from ct_stage_probes import networks_alone, stage_flops, stage_inputs

    from ctcovid.ct import CTCovidPipeline
    from ctcovid.profiling import PeakMemory, rss_bytes
    from ctcovid.running.memory import release_free_memory

    logging.getLogger("pydicom").setLevel(logging.ERROR)
    work = Path(args.workdir)

    def load(**options) -> CTCovidPipeline:
        return CTCovidPipeline(
            bundle_dir=args.bundle_dir,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            severity="always",
            slice_threshold=0.0,
            gradcam=True,
            flush_denormal=True,  # as `ctcovid predict` runs it
            **options,
        )

    t = time.perf_counter()
    pipeline = load()
    load_s = time.perf_counter() - t
    rss_after_load = rss_bytes()
    scan = Path(args.scan)

    def run_once(mem: PeakMemory | None):
        start = mem.start if mem is not None else (lambda _s: None)
        start("read")
        t0 = time.perf_counter()
        # handed straight over, as `ctcovid predict` does: process() frees the volume once normalised
        res = pipeline.process(
            pipeline.read(scan), path=scan, scan_id=args.name, read_seconds=time.perf_counter() - t0, on_stage=start
        )
        start("write")
        t1 = time.perf_counter()
        res.save(work / f"out_{args.precision}")
        # "write": mask NIfTI + JSON; the PNG montage (an output the baseline does not make) on its own
        res.timings_s["write"] = time.perf_counter() - t1 - res.timings_s.get("montage", 0.0)
        if mem is not None:
            mem.stop()
        return res

    t = time.perf_counter()
    run_once(None)
    warmup_s = time.perf_counter() - t
    mem = PeakMemory(pipeline.device)
    per_run: list[dict[str, float]] = []
    walls = []
    res = None
    for _ in range(args.repeats):  # median per stage over the timed runs: this VM's timings wander
        del res  # one scan in memory at a time, as in a batch run
        t = time.perf_counter()
        res = run_once(mem)
        walls.append(time.perf_counter() - t)
        per_run.append(dict(res.timings_s))
    median = {k: statistics.median(r[k] for r in per_run) for k in per_run[0]}
    stages = {k: round(v, 4) for k, v in median.items()}
    total = sum(median.values())
    compared = total - median.get("montage", 0.0)  # the baseline makes no montage

    class_index = 1
    # read again, untimed: the networks alone run on the exact inputs the stages fed them
    inputs = stage_inputs(pipeline, pipeline.read(scan), res)
    alone = networks_alone(pipeline, inputs, class_index, args.repeats)
    flops = stage_flops(pipeline, inputs, class_index)
    del inputs

    np.save(work / f"mask_{args.precision}.npy", np.packbits(res.lung_mask))
    if res.heatmap is not None:
        np.save(work / f"heatmap_{args.precision}.npy", res.heatmap)
    out: dict[str, Any] = {
        "scan": args.name,
        "precision": args.precision,
        "device": str(pipeline.device),
        "batch_size": pipeline.batch_size,
        "channels_last": pipeline.channels_last,
        "shape": res.shape,
        "slices_kept": res.slices_kept,
        "load_s": round(load_s, 3),
        "rss_after_load_gib": round(rss_after_load / GIB, 3),
        "warmup_run_s": round(warmup_s, 3),
        "repeats": args.repeats,
        "stages_s": stages,
        "stages_s_every_run": [{k: round(v, 3) for k, v in r.items()} for r in per_run],
        "total_s": round(total, 3),
        "total_without_montage_s": round(compared, 3),
        "wall_s_every_run": [round(w, 3) for w in walls],
        "scans_per_hour": round(3600.0 / total, 1),
        "peak_memory": {
            k: {
                "rss_gib": round(v["rss_bytes"] / GIB, 3),
                "cuda_gib": None if v["cuda_bytes"] is None else round(v["cuda_bytes"] / GIB, 3),
            }
            for k, v in mem.peaks.items()
        },
        "peak_rss_gib": round(mem.overall()["rss_bytes"] / GIB, 3),
        "peak_rss_resettable": mem.resettable,
        "network_alone_s": {k: round(v, 4) for k, v in alone.items()},
        "stage_over_network": {k: round(median[k] / alone[k], 3) for k in alone if k in median},
        "flops": flops,
        "outputs": {
            "kept_slices": len(res.kept_slices),
            "lung_voxels": res.lung_voxels,
            "covid_probability": res.covid_probability,
            "covid_member_probabilities": res.covid_member_probabilities,
            "severity_probabilities": res.severity_probabilities,
        },
    }
    if peak_cuda := mem.overall()["cuda_bytes"]:
        out["peak_cuda_gib"] = round(peak_cuda / GIB, 3)

    if args.baseline:
        from ct_pipeline_baseline import run_baseline

        # the paper's code runs the networks as trained: a fresh pipeline without batch-norm folding
        # (same weights, same memory formats); the measured one is freed first
        del pipeline
        release_free_memory()
        pipeline = load(fold_batchnorm=False)
        mem_b = PeakMemory(pipeline.device)
        mem_b.start("baseline")
        base = run_baseline(scan, pipeline, work / "baseline", gradcam=True)
        mem_b.stop()
        btotal = sum(base["timings_s"].values())
        # the baseline's read includes normalisation and its segmentation the mask clean-up
        same = dict(median)
        same["read"] = same.get("read", 0.0) + same.get("normalize", 0.0)
        same["segmentation"] = same.get("segmentation", 0.0) + same.get("mask_cleanup", 0.0)
        inter = (base["lung_mask"] > 0) & (res.lung_mask > 0)
        dice = 2 * inter.sum() / max(1, (base["lung_mask"] > 0).sum() + (res.lung_mask > 0).sum())
        out["baseline"] = {
            "stages_s": {k: round(v, 4) for k, v in base["timings_s"].items()},
            "total_s": round(btotal, 3),
            "scans_per_hour": round(3600.0 / btotal, 1),
            "speedup": round(btotal / compared, 2),
            "speedup_note": "baseline total / pipeline total without the montage (the baseline makes none)",
            "stage_speedup": {k: round(v / same[k], 2) for k, v in base["timings_s"].items() if same.get(k)},
            "peak_rss_gib_incl_loaded_pipeline": round(mem_b.overall()["rss_bytes"] / GIB, 3),
            "agreement": {
                "same_kept_slices": list(base["kept_slices"]) == list(res.kept_slices),
                "mask_dice": round(float(dice), 5),
                "covid_probability_abs_diff": None
                if base["covid_probability"] is None
                else round(abs(base["covid_probability"] - res.covid_probability), 5),
                "note": "depth resampling differs by design (baseline nearest, pipeline linear)",
            },
        }
    return out


# ------------------------------------------------------------------------------------------ parent side
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    ap.add_argument("--scans", nargs="+", default=None, help=f"subset of {[*REAL_SCANS, SYNTHETIC]}")
    ap.add_argument("--batch-size", type=int, default=None, help="pipeline batch size (default: device's)")
    ap.add_argument("--sweep", default="1,2,4,8,16,32", help="batch sizes of the sweep ('' to skip)")
    ap.add_argument("--synthetic-slices", type=int, default=300, help="slices of the synthetic scan (300)")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false")
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed runs per (scan, precision); medians reported"
    )
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(HERE / "results" / "ct_pipeline.json"))
    # child mode (internal)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scan", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--bundle-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        Path(args.result).write_text(json.dumps(child(args), indent=1))
        return

    import torch
    from common import random_weight_bundles, write_synthetic_ct_series
    from ct_stage_probes import batch_sweep, compare_precisions

    from ctcovid.io.atomic import write_json_atomic
    from ctcovid.profiling import describe_machine, matmul_throughput

    tmp = tempfile.TemporaryDirectory(prefix="ctcovid_bench_") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    machine = describe_machine(args.device)
    dev = torch.device(args.device)
    throughput = {
        p: matmul_throughput(dev, {"fp32": torch.float32, "bf16": torch.bfloat16}[p], n=4096, seconds=3.0)
        for p in args.precisions
    }
    print("matmul GFLOP/s:", {k: round(v / 1e9, 1) for k, v in throughput.items()}, flush=True)
    bundle_dir = random_weight_bundles(work / "bundles")
    scans = {k: v for k, v in REAL_SCANS.items() if v.exists()}
    missing = sorted(set(REAL_SCANS) - set(scans))
    wanted = args.scans or [*REAL_SCANS, SYNTHETIC]
    if SYNTHETIC in wanted:
        syn = work / f"synthetic_{args.synthetic_slices}"
        if not syn.exists():
            write_synthetic_ct_series(syn, n_slices=args.synthetic_slices, size=512)
        scans[SYNTHETIC] = syn
    scans = {k: v for k, v in scans.items() if k in wanted}
    sweep = [int(s) for s in args.sweep.split(",") if s.strip()]
    batch = batch_sweep(bundle_dir, args.device, args.precisions, sweep, 2.0) if sweep else {}
    print("batch sweep (ms/slice):", json.dumps(batch), flush=True)

    runs: list[dict] = []
    for name, path in scans.items():
        for precision in args.precisions:
            sw = work / name
            sw.mkdir(exist_ok=True)
            result = sw / f"result_{precision}.json"
            cmd = [
                sys.executable, __file__, "--child", "--scan", str(path), "--name", name, "--precision", precision,
                "--device", args.device, "--bundle-dir", str(bundle_dir), "--workdir", str(sw), "--result", str(result),
                "--repeats", str(args.repeats),
            ]  # fmt: skip
            if args.batch_size:
                cmd += ["--batch-size", str(args.batch_size)]
            if not (args.baseline and precision == "fp32"):
                cmd.append("--no-baseline")
            print(f"--- {name} {precision}", flush=True)
            subprocess.run(cmd, check=True)
            r = json.loads(result.read_text())
            print(
                json.dumps({k: r[k] for k in ("total_s", "stages_s", "peak_rss_gib", "stage_over_network")}),
                flush=True,
            )
            if "baseline" in r:
                print("baseline:", json.dumps(r["baseline"]), flush=True)
            runs.append(r)

    for r in runs:  # floors: FLOPs / measured matmul throughput of the same precision
        tp = throughput[r["precision"]]
        r["floor_s"] = {k: round(v / tp, 4) for k, v in r["flops"].items()}
        r["stage_over_floor"] = {
            k: round(r["stages_s"][k] / r["floor_s"][k], 2)
            for k in r["floor_s"]
            if r["floor_s"][k] > 0 and k in r["stages_s"]
        }
        r["total_over_floor"] = round(r["total_s"] / sum(r["floor_s"].values()), 2)

    comparisons = {}
    by = {(r["scan"], r["precision"]): r for r in runs}
    for name in scans:
        if (name, "fp32") in by and (name, "bf16") in by:
            comparisons[name] = {
                **compare_precisions(work / name, by[(name, "fp32")], by[(name, "bf16")]),
                "speedup": round(by[(name, "fp32")]["total_s"] / by[(name, "bf16")]["total_s"], 2),
            }

    report = {
        "benchmark": "ct_pipeline",
        "command": "python " + " ".join([str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine,
        "load_average_at_end": list(os.getloadavg()),
        "matmul_gflops": {k: round(v / 1e9, 1) for k, v in throughput.items()},
        "notes": [
            "random weights for stages without shipped weights (same FLOPs, meaningless outputs)",
            "slice_threshold 0: every slice kept; severity graded on every scan",
            "stage times: median of `repeats` runs after a warm-up run, in a fresh process per (scan, precision)",
            "network_alone_s: median of `repeats` runs of the stage's network calls on the exact prepared inputs",
            "segmentation = network loop + probability upsampling; mask_cleanup = the bundle's 3D connected"
            " components (baseline: both inside its segmentation)",
            "floors: FLOPs of convolutions and matrix products / measured matmul throughput (same precision)",
            "flush-denormal on (as `ctcovid predict` runs) for pipeline and baseline alike",
        ],
        "real_scans_missing": [str(REAL_SCANS[m]) for m in missing],
        "batch_sweep_ms_per_slice": batch,
        "runs": runs,
        "bf16_vs_fp32": comparisons,
        "bench_wall_s": round(time.perf_counter() - t, 1),
    }
    write_json_atomic(report, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
