"""``ctcovid demo``: the whole CT pipeline on a built-in real CT, no download, no data folder needed.

The default input is ``CT_small.dcm``, a real 128x128 thoracic CT slice in HU ("downsized from NEMA WG04
CT1_UNC") that ships inside the pydicom wheel, read as a one-slice scan. The other CT files pydicom ships
are head CTs (``693_*``, ``J2K_pixelrep_mismatch``) and are not used: a chest model has nothing to say
about them. Every stage with shipped weights runs; stages without weights are reported with how to train
them, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .predict import EXIT_OK, EXIT_SCANS_FAILED, add_pipeline_arguments, build_pipeline, error

DEFAULT_OUT = "ctcovid_demo_output"

_STAGE_TITLES = {
    "slice_filter": "slice filter",
    "segmentation": "lung segmentation",
    "detection": "COVID-19 detection",
    "severity": "severity grading",
}


def demo_inputs() -> list[Path]:
    """The built-in demo scans: pydicom's thoracic ``CT_small.dcm`` (found in the installed wheel)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    if path is None:  # a pydicom build without its test files
        raise FileNotFoundError("pydicom's CT_small.dcm is not installed with this pydicom")
    return [Path(path)]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="run the whole CT pipeline on a built-in real CT slice (no download) and show where outputs are",
        description=(
            "Runs every CT stage that has shipped weights on pydicom's CT_small.dcm (a real thoracic CT slice, "
            "128x128, HU) read as a one-slice scan, says plainly which stages have no weights and how to train "
            "them, and prints where the outputs are."
        ),
    )
    p.add_argument("--out", "-o", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    add_pipeline_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    try:
        inputs = demo_inputs()
    except FileNotFoundError as e:
        error("demo", str(e))
        return EXIT_SCANS_FAILED
    print(
        f"ctcovid demo: input {inputs[0]} (real thoracic CT slice shipped with pydicom, read as a 1-slice scan)"
    )
    pipeline = build_pipeline(args, "demo", skip_missing=True, allow_2d=True)
    if isinstance(pipeline, int):
        return pipeline
    skipped = pipeline.skipped_stages()
    for stage, model in pipeline.models.items():
        title = _STAGE_TITLES[stage]
        if stage in skipped:
            extra = " -> the lung-mask area decides which slices are lung" if stage == "slice_filter" else ""
            print(f"  {title}: {skipped[stage]}{extra}")
        else:
            print(
                f"  {title}: bundle {model.bundle} v{model.version} (weights sha256 {model.weights_sha256[:12]})"
            )

    from .predict import run_and_report

    code = run_and_report(args, "demo", inputs, pipeline)
    out = Path(args.out).resolve()
    for record in sorted(out.glob("*.json")):
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        _print_record(data, out)
    print(f"Outputs are in {out}")
    return EXIT_OK if code == EXIT_OK else code


def _print_record(data: dict, out: Path) -> None:
    scan = data.get("scan", {})
    print(f"{scan.get('id')}: {data.get('status')}" + (f" ({data['reason']})" if data.get("reason") else ""))
    if data.get("status") != "ok":
        return
    slices = data.get("slices", {})
    vol = data.get("lung_volume_ml")
    print(
        f"  slices kept {slices.get('kept')}/{slices.get('read')} ({slices.get('selection')}); "
        f"lung volume {'unknown' if vol is None else f'{vol:.1f} ml'}"
    )
    stages = data.get("stages", {})

    def why(stage: str) -> str:
        status = str(stages.get(stage, "not run"))
        return (
            "skipped (no trained weights, see above)" if status.startswith("skipped: no trained") else status
        )

    det = data.get("detection")
    if det:
        print(
            f"  P(COVID-19) {det['covid_probability']:.3f} ± {det['covid_probability_spread']:.3f} -> {det['prediction']}"
        )
    else:
        print(f"  detection: {why('detection')}")
    sev = data.get("severity")
    print(f"  severity: {sev['grade']}" if sev else f"  severity: {why('severity')}")
    for kind, name in (data.get("outputs") or {}).items():
        print(f"  {kind}: {out / name}")
    sys.stdout.flush()
