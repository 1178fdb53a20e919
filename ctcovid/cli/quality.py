"""``ctcovid quality``: screen chest radiographs for blur and bad contrast before training or prediction.

Every image (files, or every X-ray file below given folders) is read with :func:`ctcovid.io.load_xray` and
checked by :class:`ctcovid.transforms.ImageQualityFilter`; the command prints what it would remove and why and
writes a CSV report (one row per image) into the output folder ``--out``. Unreadable files are reported, not
fatal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ctcovid.transforms.quality import DEFAULT_BLUR_THRESHOLD, DEFAULT_CONTRAST_RANGE

    p = subparsers.add_parser(
        "quality",
        help="find blurry and low/high-contrast chest radiographs (data curation)",
        description="Variance of the Laplacian (blur) and RMS contrast of each radiograph at a fixed analysis "
        "size; images below the blur threshold or outside the contrast range are reported with the reason.",
    )
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--blur-threshold", type=float, default=DEFAULT_BLUR_THRESHOLD,
                   help=f"minimum variance of the Laplacian, 0-255 scale (default {DEFAULT_BLUR_THRESHOLD:g}); "
                   "0 disables the blur check")
    p.add_argument("--contrast-low", type=float, default=DEFAULT_CONTRAST_RANGE[0],
                   help=f"minimum RMS contrast of [0, 1] intensities (default {DEFAULT_CONTRAST_RANGE[0]:g})")
    p.add_argument("--contrast-high", type=float, default=DEFAULT_CONTRAST_RANGE[1],
                   help=f"maximum RMS contrast (default {DEFAULT_CONTRAST_RANGE[1]:g})")
    p.add_argument("--analysis-size", type=int, default=224, help="side of the square images are measured at")
    p.add_argument("--out", "-o", required=True, help="output folder (created); the report is written there")
    p.add_argument(
        "--report-name", default="quality_report.csv", help="file name of the CSV report (default quality_report.csv)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ctcovid.cxr.datalists import image_datalist
    from ctcovid.io.errors import EmptyInputError
    from ctcovid.transforms.quality import ImageQualityFilter, curate, write_curation_report

    items = []
    for src in args.inputs:
        items.extend(image_datalist(src))
    if not items:
        raise EmptyInputError(", ".join(args.inputs), "no X-ray image files found")
    qf = ImageQualityFilter(
        blur_threshold=args.blur_threshold or None,
        contrast_range=(args.contrast_low, args.contrast_high),
        analysis_size=args.analysis_size,
    )
    report = curate(items, qf)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = write_curation_report(report, out / args.report_name)
    summary = {**report.summary(), "report": str(path)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['total']} images: {summary['kept']} kept, {summary['removed']} removed -> {path}")
    for reason, n in summary["removed_by_reason"].items():
        print(f"  {reason}: {n}")
    for it in report.removed:
        print(f"  removed {it['image']}: {'; '.join(it['quality']['reasons'])}")
    return 0
