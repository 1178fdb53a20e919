"""``ctcovid label-app``: print the folder of the MONAI Label app (what ``monailabel start_server --app`` takes)."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "label-app",
        help="print the MONAI Label app folder (serves the CT models to 3D Slicer)",
        description=(
            "Print the folder of the MONAI Label app shipped with ctcovid. Start the server with "
            "`monailabel start_server --app \"$(ctcovid label-app)\" --studies <folder>` "
            "(needs the label extra: pip install 'ctcovid[label]'). The path goes to stdout, the hint to stderr."
        ),
    )
    p.add_argument(
        "--copy-to",
        metavar="DIR",
        default=None,
        help="copy the app into DIR (a writable folder: MONAI Label writes model/ and logs/ there) and print DIR",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ctcovid.label import app_dir, copy_app

    path = copy_app(args.copy_to) if args.copy_to else app_dir()
    print(path)
    print(
        f"start it with: monailabel start_server --app {path} --studies <folder of NIfTI / DICOM series> "
        "--host 127.0.0.1 --port 8000",
        file=sys.stderr,
    )
    return 0
