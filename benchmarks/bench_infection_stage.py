"""Time the two inference changes of the CT lesion stage, old and new in turns, on real slices.

Usage::

    .venv/bin/python benchmarks/bench_infection_stage.py [--rounds 5]

Slices: COVID-CT-MD ``normal002`` (HU), normalised as the pipeline does, its middle 123 slices (the lung
slices the lesion stage sees on this scan) resized to the lesion network's 256 x 256.

- CLAHE: scikit-image ``equalize_adapthist`` slice by slice (the transform before) against
  :class:`ctcovid.transforms.CLAHE` (batched, :func:`~ctcovid.transforms.clahe.equalize_adapthist_batch`),
  both on the stage's batches of 4 slices; their outputs must be equal.
- Networks: the shipped lesion and lung Attention U-Nets (batch norms folded, channels-last, fp32, batches
  of 4 as the pipeline runs them) with MONAI's instance norms against group norms
  (:func:`ctcovid.networks.instance_norms_as_group_norms`); largest output difference.

Each pair runs in turns ``--rounds`` times after a warm-up (this VM's speed drifts over minutes); best and
median seconds. Writes ``benchmarks/results/ct_infection_stage_speed.json`` (atomically).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CTCOVID_DATA", ROOT.parent / "shared" / "data")).resolve()


def _in_turns(fns: dict, rounds: int) -> dict:
    for fn in fns.values():
        fn()  # warm-up
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: {"best_s": round(min(v), 3), "median_s": round(statistics.median(v), 3)} for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from common import save_result
    from skimage.exposure import equalize_adapthist

    from ctcovid.bundle.loading import load_stage
    from ctcovid.io import load_ct
    from ctcovid.networks import fold_batchnorm, instance_norms_as_group_norms
    from ctcovid.transforms import CLAHE, NormalizeCTIntensity

    vol = NormalizeCTIntensity()(load_ct(DATA / "ct" / "covid_ct_md" / "normal002")).as_tensor()[0]
    mid = vol.shape[-1] // 2
    slices = vol[:, :, mid - 61 : mid + 62].permute(2, 0, 1)[:, None].float()
    slices = F.interpolate(slices, size=(256, 256), mode="bilinear", align_corners=False)  # (123, 1, 256, 256)
    batches = list(torch.split(slices, 4))
    clahe = CLAHE(clip_limit=0.01)

    def per_slice():  # the transform before: min..max to [0, 1], skimage, back, one slice at a time
        out = []
        for b in batches:
            for s in b[:, 0].double().numpy():
                lo, hi = s.min(), s.max()
                eq = equalize_adapthist((s - lo) / (hi - lo), clip_limit=0.01)
                out.append(lo + np.clip(eq, 0, 1) * (hi - lo))
        return np.stack(out).astype(np.float32)

    def batched():
        return np.concatenate([clahe(b[:, 0].permute(1, 2, 0)[None])[0].permute(2, 0, 1).numpy() for b in batches])

    clahe_row = _in_turns({"scikit_image_per_slice": per_slice, "batched": batched}, args.rounds)
    clahe_row["outputs_equal"] = bool(np.array_equal(per_slice(), batched()))
    print("clahe", clahe_row, flush=True)

    cl = torch.channels_last
    networks = {}
    for key, bundle in (("infection", "ct_lung_infection_segmentation"), ("segmentation", "ct_lung_segmentation")):
        net = load_stage(key, bundle, ROOT / "bundles", torch.device("cpu")).network.eval()
        fold_batchnorm(net)
        swapped = copy.deepcopy(net)
        row: dict = {"instance_norms": instance_norms_as_group_norms(swapped)}
        net, swapped = net.to(memory_format=cl), swapped.to(memory_format=cl)
        inputs = [b.contiguous(memory_format=cl) for b in batches]

        def run(m, inputs=inputs):
            with torch.inference_mode():
                return [m(x) for x in inputs]

        turns = {"instance_norm": lambda n=net: run(n), "group_norm": lambda n=swapped: run(n)}
        row.update(_in_turns(turns, args.rounds))
        row["max_abs_logit_diff"] = max(float((a - b).abs().max()) for a, b in zip(run(net), run(swapped)))
        networks[key] = row
        print(key, row, flush=True)
    save_result(
        "ct_infection_stage_speed.json",
        "CT lesion stage inference: per-slice vs batched CLAHE; instance vs group norms (123 slices, in turns)",
        torch_threads=torch.get_num_threads(),
        rounds=args.rounds,
        slices=int(slices.shape[0]),
        clahe=clahe_row,
        networks=networks,
    )


if __name__ == "__main__":
    main()
