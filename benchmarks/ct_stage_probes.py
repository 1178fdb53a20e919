"""Probes of the CT pipeline benchmark: each stage's exact network inputs, the networks timed alone, their FLOPs,
a batch-size sweep of the slice-level networks, and how far bf16 moves the outputs from fp32.

Used by :mod:`bench_ct_pipeline` (its child process measures one scan and precision; its parent sweeps and
compares); kept apart so each file does one job.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any


def time_it(fn, device, repeats: int = 1) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` (device synchronised)."""
    from common import timed_call

    return statistics.median(timed_call(fn, device) for _ in range(repeats))


def stage_inputs(pipeline, volume, res) -> dict[str, Any]:
    """The exact network inputs of each stage for this scan, built as the pipeline builds them."""
    from ctcovid.ct.context import NormalizedViews, take_slices

    norm = NormalizedViews(volume, pipeline.normalization_args)
    out: dict[str, Any] = {}
    size = pipeline.slice_filter.in_plane_size((224, 224))
    out["slice_filter"] = [
        b for _, b in pipeline.runner.slice_batches(norm.get(pipeline.slice_filter), size, "slice_filter")
    ]
    out["segmentation"] = [
        b
        for _, b in pipeline.runner.slice_batches(norm.get(pipeline.segmenter), pipeline.stage("segmentation").size, "segmentation")
    ]
    import torch

    kept_mask = take_slices(torch.from_numpy(res.lung_mask)[None], res.kept_slices)
    x = pipeline.stage("detection").build_input(pipeline, take_slices(norm.get(pipeline.detector), res.kept_slices), kept_mask)
    out["detection"] = pipeline.runner.network_input("detection", x)
    x = pipeline.stage("severity").build_input(pipeline, take_slices(norm.get(pipeline.grader), res.kept_slices), kept_mask)
    out["severity"] = pipeline.runner.network_input("severity", x)
    return out


def networks_alone(pipeline, inputs: dict[str, Any], class_index: int, repeats: int) -> dict[str, float]:
    """Seconds of each stage's network work alone on prepared inputs (median of ``repeats``)."""
    import torch

    dev = pipeline.device
    ac = pipeline.runner.autocast

    def slices(net, batches):
        def run():
            with torch.inference_mode(), ac():
                for b in batches:
                    net(b)

        return run

    def detection():
        with torch.inference_mode(), ac():
            pipeline.detector.network.member_probabilities(inputs["detection"])

    def gradcam():  # forward + backward of every member to the target layer's gradient, as Grad-CAM does
        for member in pipeline.detector.network.members:
            x = inputs["detection"].detach().clone().requires_grad_(True)
            with torch.enable_grad(), ac():
                logits = member(x)
            logits[0, class_index].backward()
            member.zero_grad(set_to_none=True)

    def severity():
        with torch.inference_mode(), ac():
            pipeline.grader.network.predict_with_spread(inputs["severity"])

    fns = {
        "slice_filter": slices(pipeline.slice_filter.network, inputs["slice_filter"]),
        "segmentation": slices(pipeline.segmenter.network, inputs["segmentation"]),
        "detection": detection,
        "gradcam": gradcam,
        "severity": severity,
    }
    return {stage: time_it(fn, dev, repeats=repeats) for stage, fn in fns.items()}


def stage_flops(pipeline, inputs: dict[str, Any], class_index: int) -> dict[str, int]:
    """FLOPs of each stage's networks for this scan (convolutions + matrix products)."""
    import torch

    from ctcovid.profiling import count_flops

    def per_slice_total(net, batches):
        one = batches[0][:1]
        with torch.inference_mode():
            per_slice = count_flops(net, one)
        return per_slice * sum(int(b.shape[0]) for b in batches)

    def gradcam():
        for member in pipeline.detector.network.members:
            x = inputs["detection"].detach().float().clone().requires_grad_(True)
            member(x)[0, class_index].backward()
            member.zero_grad(set_to_none=True)

    with torch.inference_mode():
        det = count_flops(pipeline.detector.network.member_probabilities, inputs["detection"].float())
        sev = count_flops(pipeline.grader.network.predict_with_spread, inputs["severity"].float())
    return {
        "slice_filter": per_slice_total(pipeline.slice_filter.network, inputs["slice_filter"]),
        "segmentation": per_slice_total(pipeline.segmenter.network, inputs["segmentation"]),
        "detection": det,
        "gradcam": count_flops(gradcam),
        "severity": sev,
    }


def batch_sweep(
    bundle_dir: Path, device: str, precisions: list[str], sizes: list[int], seconds: float
) -> dict:
    """Seconds per slice of the slice-level networks at each batch size (random [0, 1] slices)."""
    import torch

    from ctcovid.ct import CTCovidPipeline
    from ctcovid.profiling import sync_device

    out: dict[str, Any] = {}
    for precision in precisions:
        p = CTCovidPipeline(
            bundle_dir=bundle_dir, device=device, precision=precision, skip_missing=True, flush_denormal=True
        )
        for stage, model, size in (
            ("slice_filter", p.slice_filter, p.slice_filter.in_plane_size((224, 224))),
            ("segmentation", p.segmenter, p.stage("segmentation").size),
        ):
            if not model.available:
                continue
            row = {}
            for bs in sizes:
                x = p.runner.network_input(stage, torch.rand(bs, 1, *size))
                with torch.inference_mode(), p.runner.autocast():
                    model.network(x)  # warm-up
                    n, t = 0, time.perf_counter()
                    while True:
                        model.network(x)
                        sync_device(p.device)
                        n += bs
                        if time.perf_counter() - t > seconds:
                            break
                row[str(bs)] = round((time.perf_counter() - t) / n * 1000, 2)
            out[f"{stage}_{precision}_ms_per_slice"] = row
        del p
    return out


def compare_precisions(work: Path, fp32: dict, bf16: dict) -> dict:
    """How much bf16 moves the outputs relative to fp32 on the same scan."""
    import numpy as np

    shape = fp32["shape"]
    n = int(np.prod(shape))
    a = np.unpackbits(np.load(work / "mask_fp32.npy"))[:n].astype(bool)
    b = np.unpackbits(np.load(work / "mask_bf16.npy"))[:n].astype(bool)
    dice = 2 * (a & b).sum() / max(1, a.sum() + b.sum())
    o32, o16 = fp32["outputs"], bf16["outputs"]
    out = {
        "mask_dice": round(float(dice), 5),
        "mask_voxels_changed": int((a ^ b).sum()),
        "covid_probability_abs_diff": round(abs(o32["covid_probability"] - o16["covid_probability"]), 5),
        "covid_member_max_abs_diff": round(
            max(
                abs(x - y)
                for x, y in zip(o32["covid_member_probabilities"], o16["covid_member_probabilities"])
            ),
            5,
        ),
        "severity_max_abs_diff": round(
            max(
                abs(o32["severity_probabilities"][k] - o16["severity_probabilities"][k])
                for k in o32["severity_probabilities"]
            ),
            5,
        ),
    }
    h32, h16 = work / "heatmap_fp32.npy", work / "heatmap_bf16.npy"
    if h32.exists() and h16.exists():
        x, y = np.load(h32).ravel(), np.load(h16).ravel()
        out["gradcam_pearson_r"] = (
            round(float(np.corrcoef(x, y)[0, 1]), 4) if x.std() > 0 and y.std() > 0 else None
        )
        out["gradcam_max_abs_diff"] = round(float(np.abs(x - y).max()), 4)
    return out
