"""Channels-last against contiguous memory format for each CT network, fp32 and bf16 autocast.

Usage (by hand, quiet machine)::

    .venv/bin/python benchmarks/bench_memory_format.py [--device cpu] [--seconds 3]

Each network of the four CT bundles (random weights where none ship: same FLOPs) is timed on random
[0, 1] inputs of its pipeline shape -- slice networks at the pipeline's default CPU batch of 4 -- in both
memory formats and both precisions, median seconds per call over about ``--seconds``. The result decides
each bundle's ``channels_last`` config value. Writes ``benchmarks/results/ct_memory_format.json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    from common import median_call_seconds, network_bench_args, random_weight_pipeline, write_bench_result

    args = network_bench_args(__doc__, HERE / "results" / "ct_memory_format.json")

    import torch

    p = random_weight_pipeline(args, channels_last=False, fold_batchnorm=False)
    shapes = {
        "slice_filter": (4, 1, *p.slice_filter.in_plane_size((224, 224))),
        "segmentation": (4, 1, *p.stage("segmentation").size),
        "detection": (1, 64, *p.detector.in_plane_size((224, 224))),
        "severity": (1, 48, *p.grader.in_plane_size((299, 299))),
    }
    results: dict[str, dict] = {}
    for stage, shape in shapes.items():
        net = p.models[stage].network
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(0)).to(p.device)
        row = {}
        for fmt in ("contiguous", "channels_last"):
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            net.to(memory_format=mf)
            xi = x.contiguous(memory_format=mf)
            for precision in ("fp32", "bf16"):
                with (
                    torch.inference_mode(),
                    torch.autocast(p.device.type, torch.bfloat16, enabled=precision == "bf16"),
                ):
                    seconds = median_call_seconds(lambda: net(xi), args.seconds, p.device)  # noqa: B023
                row[f"{fmt}_{precision}_s"] = round(seconds, 4)
        net.to(memory_format=torch.contiguous_format)
        for precision in ("fp32", "bf16"):
            row[f"channels_last_speedup_{precision}"] = round(
                row[f"contiguous_{precision}_s"] / row[f"channels_last_{precision}_s"], 2
            )
        row["input_shape"] = list(shape)
        row["bundle_channels_last"] = bool(p.models[stage].config_value("channels_last", default=False))
        results[stage] = row
        print(stage, row, flush=True)
    note = "median seconds per forward call; random weights where none ship (same FLOPs)"
    write_bench_result("ct_memory_format", "bench_memory_format.py", args.device, note, results, args.out)


if __name__ == "__main__":
    main()
