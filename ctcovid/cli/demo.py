"""``ctcovid demo``: the whole CT pipeline on a built-in real CT, no download, no data folder needed.

The default input is ``ctcovid/demo_data/chest_ct_2_slices``: two real, full 512x512 axial chest CT slices
at heart level (both lungs, HU) from the lungmask project's test data, Apache-2.0 (source and licence in
``ctcovid/demo_data/data_license.txt``), shipped inside the package. Every stage with shipped weights runs;
stages without weights are reported with how to train them, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .predict import (
    EXIT_OK,
    EXIT_SCANS_FAILED,
    EXIT_USAGE,
    add_pipeline_arguments,
    build_pipeline,
    error,
    output_folder_ok,
)

DEFAULT_OUT = "ctcovid_demo_output"

_STAGE_TITLES = {
    "slice_filter": "slice filter",
    "segmentation": "lung segmentation",
    "infection": "lesion segmentation (involvement, CT grade)",
    "detection": "COVID-19 detection",
    "severity": "severity grading",
}


def demo_inputs() -> list[Path]:
    """The built-in demo scan: a two-slice chest CT DICOM series shipped inside the package."""
    scan = Path(__file__).resolve().parents[1] / "demo_data" / "chest_ct_2_slices"
    if not scan.is_dir():  # a broken install
        raise FileNotFoundError(f"the built-in demo scan is missing: {scan}")
    return [scan]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="run the whole CT pipeline on a built-in real chest CT (no download) and show where outputs are",
        description=(
            "Runs every CT stage that has shipped weights on a built-in real chest CT (two 512x512 slices at "
            "heart level, HU; Apache-2.0, see ctcovid/demo_data/data_license.txt), says plainly which stages "
            "have no weights and how to train them, and prints where the outputs are."
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
        f"ctcovid demo: input {inputs[0]} (real chest CT, 2 axial slices at heart level, built in)"
    )
    if not output_folder_ok("demo", args.out):
        return EXIT_USAGE
    pipeline = build_pipeline(args, "demo", skip_missing=True, allow_2d=True)
    if isinstance(pipeline, int):
        return pipeline
    skipped = pipeline.skipped_stages()
    for stage, model in pipeline.models.items():
        title = _STAGE_TITLES.get(stage, stage)
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

    inf = data.get("infection")
    if inf:
        ml = inf.get("infection_volume_ml")
        pct = inf.get("lung_involvement_percent")
        print(
            f"  lesions {'unknown volume' if ml is None else f'{ml:.1f} ml'}, lung involvement "
            f"{'unknown' if pct is None else f'{pct:.1f}%'} -> {inf['ct_severity_grade']} "
            f"(from {inf['ct_severity_source']})"
        )
    else:
        print(f"  lesions: {why('infection')}")
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
