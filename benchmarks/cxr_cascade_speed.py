"""Seconds per radiograph of the X-ray cascade with its Grad-CAM overlay, for one or more bundle folders run in
turns on the same films (issue 18: at most 0.3 s on this CPU).

The work of ``ctcovid cxr predict`` per film: read, stage 1 (with the X-ray lung segmenter first when the weights
were trained on lung-box crops), stage 2 where the threshold is passed, Grad-CAM of the deciding stage, overlay
PNG. Films: the first ``--images`` of stage 1's Kermany ``validation`` part (children; the answers are not scored
here). Each bundle folder runs every film once per round, rounds alternate between folders so that load on the
machine falls on all alike; the first film of each folder is a warm-up and is not counted.

    python benchmarks/cxr_cascade_speed.py --bundles bundles --bundles /path/to/other/bundles \
        [--out benchmarks/results/cxr_cascade_speed.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    import torch
    from common import write_result_file

    from ctcovid.cxr import STAGE1_BUNDLE, CXRCascade
    from ctcovid.cxr.datalists import load_datalist
    from ctcovid.profiling import describe_machine
    from ctcovid.training.data_root import default_data_root

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=default_data_root(), help="shared data folder (default: $CTCOVID_DATA or ../shared/data)")
    p.add_argument("--bundles", action="append", help="bundle folder (repeat to compare; default: the repository's)")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cxr_cascade_speed.json"))
    args = p.parse_args(argv)

    folders = args.bundles or [str(ROOT / "bundles")]
    items = load_datalist(ROOT / "bundles" / STAGE1_BUNDLE / "configs" / "datalist.json", "validation",
                          Path(args.data) / "cxr" / "kermany", limit=args.images + 1)
    cascades = {f: CXRCascade.from_bundles(f, device="cpu") for f in folders}
    times: dict[str, list[float]] = {f: [] for f in folders}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for f, cascade in cascades.items():
                for i, it in enumerate(items):
                    t = time.perf_counter()
                    cascade.predict(it["image"], overlay_path=Path(tmp) / f"{i}.png")
                    if i > 0 or rnd > 0:
                        times[f].append(time.perf_counter() - t)
    result = {
        "what": "seconds per radiograph, X-ray cascade with Grad-CAM overlay (ctcovid cxr predict work)",
        "films": f"Kermany validation, first {len(items)} (first film of the first round = warm-up)",
        "machine": describe_machine("cpu"), "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "runs": [
            {"bundles": f, "stage1_lung_box_margin": cascades[f].stage1.provenance.get("lung_box_margin"),
             "stage1_sha256": cascades[f].stage1.provenance.get("weights_sha256"),
             "median_s": round(statistics.median(ts), 4), "max_s": round(max(ts), 4), "n": len(ts)}
            for f, ts in times.items()
        ],
    }
    write_result_file(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
