"""Batch norms folded into their convolutions against not, for the slice-level CT networks.

Usage (by hand, quiet machine)::

    .venv/bin/python benchmarks/bench_batchnorm_folding.py [--device cpu] [--seconds 3]

The slice filter (ResNeXt-50) and the lung segmenter (Attention U-Net) of the CT bundles (random weights
where none ship: same FLOPs) are timed on random [0, 1] slices at their pipeline sizes, channels-last as
the bundles run them, in fp32 and bf16 autocast at the pipeline's default CPU batch sizes (4 and 8): as
built, and after :func:`ctcovid.networks.fold_batchnorm`. Median seconds per call over about ``--seconds``,
and the largest output difference the folding makes. Writes
``benchmarks/results/ct_batchnorm_folding.json``; it decides ``CTCovidPipeline(fold_batchnorm=True)``.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    from common import median_call_seconds, network_bench_args, random_weight_pipeline, write_bench_result

    args = network_bench_args(__doc__, HERE / "results" / "ct_batchnorm_folding.json")

    import torch

    from ctcovid.networks import fold_batchnorm

    names = ("ct_lung_slice_filter", "ct_lung_segmentation")
    p = random_weight_pipeline(args, names, fold_batchnorm=False, skip_missing=True)
    sizes = {"slice_filter": p.slice_filter.in_plane_size((224, 224)), "segmentation": p.stage("segmentation").size}
    cl = torch.channels_last
    results: dict[str, dict] = {}
    for stage, size in sizes.items():
        plain = p.models[stage].network.to(memory_format=cl)
        folded = copy.deepcopy(plain)
        row: dict = {"folded_batchnorms": fold_batchnorm(folded), "in_plane_size": list(size)}
        folded.to(memory_format=cl)
        for precision, batch in (("fp32", 4), ("bf16", 8)):
            x = torch.rand(batch, 1, *size, generator=torch.Generator().manual_seed(0))
            x = x.to(p.device).contiguous(memory_format=cl)
            with (
                torch.inference_mode(),
                torch.autocast(p.device.type, torch.bfloat16, enabled=precision == "bf16"),
            ):
                for name, net in (("as_built", plain), ("folded", folded)):
                    row[f"{name}_{precision}_batch{batch}_s"] = round(
                        median_call_seconds(lambda: net(x), args.seconds, p.device), 4  # noqa: B023
                    )
                diff = (plain(x).float() - folded(x).float()).abs().max().item()
            row[f"speedup_{precision}"] = round(
                row[f"as_built_{precision}_batch{batch}_s"] / row[f"folded_{precision}_batch{batch}_s"], 3
            )
            row[f"max_abs_output_diff_{precision}"] = diff
        results[stage] = row
        print(stage, row, flush=True)
    note = "median seconds per forward call, channels-last; random weights where none ship (same FLOPs); logits"
    write_bench_result("ct_batchnorm_folding", "bench_batchnorm_folding.py", args.device, note, results, args.out)


if __name__ == "__main__":
    main()
