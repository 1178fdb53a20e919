"""``ctcovid predict``: run the CT pipeline on scans and write per-scan outputs plus ``summary.csv``."""

from __future__ import annotations

import argparse
import sys

#: Exit codes of ``ctcovid predict`` and ``ctcovid demo``.
EXIT_OK = 0  # every scan ok or already done
EXIT_SCANS_FAILED = 1  # the run finished but at least one scan failed (see summary.csv)
EXIT_USAGE = 2  # bad arguments: input path not found, unknown device, ... (nothing was run)
EXIT_MODELS = 3  # a model cannot be loaded: missing weights (the message names the bundle), broken bundle
EXIT_INTERRUPTED = 130  # Ctrl-C: finished scans are kept; re-run the same command to resume

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}    all scans ok (or already done)
  {EXIT_SCANS_FAILED}    some scans failed (status and reason in summary.csv); the others were processed
  {EXIT_USAGE}    usage error (missing input path, bad option, an output folder that cannot be written); nothing was run
  {EXIT_MODELS}    a model could not be loaded (missing weights name the bundle and how to train it)
  {EXIT_INTERRUPTED}  interrupted; re-run the same command to resume where it stopped"""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``predict`` and ``demo``."""
    p.add_argument(
        "--bundle-dir", default=None, help="folder holding the bundles (default: the package's bundles/)"
    )
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto = cuda if available)"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="slices per batch in slice-level stages (default: the fastest measured: on CPU 4 in fp32, 8 in bf16; 32 on CUDA)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="network arithmetic: fp32 (default) or bf16 autocast (for CPUs with AVX-512 BF16 and Ampere+ "
        "GPUs: whole scans measured up to 1.6x faster on CPU; outputs move slightly, see README Performance)",
    )
    p.add_argument(
        "--workers", type=non_negative_int, default=1, help="scans read ahead in background threads (1)"
    )
    p.add_argument(
        "--severity",
        choices=("covid", "always", "never"),
        default="covid",
        help="grade severity on scans predicted COVID-19 (covid, default), on all scans, or never",
    )
    p.add_argument("--force", action="store_true", help="recompute scans already done in --out")
    p.add_argument("--no-gradcam", action="store_true", help="skip the Grad-CAM heat map (faster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict",
        help="run the CT pipeline on DICOM series, NIfTI files, slice folders or folders of scans",
        description=(
            "Read each scan, filter lung slices, segment the lungs, run the COVID-19 detection ensemble and the "
            "severity ensemble (on scans predicted COVID-19, or all with --severity always). Writes "
            "<scan>.json, <scan>_lung_mask.nii.gz, <scan>_montage.png (and <scan>_seg.dcm, a DICOM SEG, for DICOM "
            "series) per scan and summary.csv into --out. "
            "A failing scan does not stop the run; re-running reuses the scans already done (summary.csv keeps "
            "their results, with reused=True)."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="DICOM series folder, NIfTI file, JPG/PNG slice folder, or a folder of such scans",
    )
    p.add_argument("--out", "-o", required=True, help="output folder (created)")
    add_pipeline_arguments(p)
    missing = p.add_mutually_exclusive_group()
    missing.add_argument(
        "--require-all",
        action="store_true",
        help="stop (exit 3) if any stage's bundle has no trained weights, instead of running the others and "
        "saying which did not run (the default)",
    )
    missing.add_argument("--skip-missing", action="store_true", help=argparse.SUPPRESS)  # the default since 0.2
    p.add_argument("--allow-2d", action="store_true", help="accept single-slice inputs as 1-slice scans")
    p.add_argument(
        "--assign-dicom-uids",
        action="store_true",
        help="for a DICOM series whose export dropped the UIDs a DICOM SEG must reference (anonymised data): write "
        "<scan>_dicom/, a copy of the series with UIDs assigned, and the SEG referencing it (scans done without "
        "it are recomputed)",
    )
    p.set_defaults(func=run)
    return p


def error(command: str, message: str) -> None:
    print(f"ctcovid {command}: error: {message}", file=sys.stderr)


def build_pipeline(args, command: str, skip_missing: bool, allow_2d: bool):
    """The pipeline for ``args``, or an exit code after printing why it cannot be built."""
    from ctcovid.bundle import BundleError, MissingWeightsError
    from ctcovid.ct import CTCovidPipeline

    try:
        return CTCovidPipeline(
            bundle_dir=args.bundle_dir,
            device=args.device,
            batch_size=args.batch_size,
            precision=args.precision,
            flush_denormal=True,  # the CLI owns the process: denormals only slow the CPU down
            severity=args.severity,
            skip_missing=skip_missing,
            allow_2d=allow_2d,
            gradcam=not args.no_gradcam,
            assign_dicom_uids=getattr(args, "assign_dicom_uids", False),
        )
    except (MissingWeightsError, BundleError) as e:
        error(command, str(e))
        return EXIT_MODELS
    except ValueError as e:  # unknown or unavailable device
        error(command, str(e))
        return EXIT_USAGE


def run_and_report(args, command: str, inputs, pipeline, summary_name: str = "summary.csv") -> int:
    """Run the batch, print a summary and return the exit code."""
    from ctcovid.running.batch import run_batch

    try:
        report = run_batch(
            inputs,
            args.out,
            pipeline,
            force=args.force,
            workers=args.workers,
            progress=not args.no_progress,
            summary_name=summary_name,
        )
    except KeyboardInterrupt:
        error(command, f"interrupted; finished scans are in {args.out}; re-run the same command to resume")
        return EXIT_INTERRUPTED
    n = len(report.rows)
    print(
        f"{n} scan(s): {report.ok} ok ({report.reused} reused from an earlier run), {report.failed} failed. "
        f"Outputs in {report.out_dir.resolve()} (summary: {report.summary_path.name})"
    )
    for row in report.rows:
        print(scan_line(row))
    return EXIT_SCANS_FAILED if report.failed else EXIT_OK


def scan_line(row: dict) -> str:
    """One console line per scan from its summary row: lung volume, involvement and grade (or why not)."""
    if row.get("status") == "failed":
        return f"  failed: {row['scan_id']}: {row['reason']}"

    def num(key: str) -> float | None:  # a report row holds numbers, a row read back from the CSV strings
        v = row.get(key)
        return None if v in (None, "") else float(v)

    vol = num("lung_volume_ml")
    parts = [f"lung {vol:.0f} ml" if vol is not None else "lung volume unknown (no voxel spacing)"]
    pct = num("lung_involvement_percent")
    if pct is not None:
        parts.append(f"involvement {pct:.1f}% ({row.get('ct_severity_grade')})")
    else:
        parts.append(f"involvement not measured ({row.get('infection_status')})")
    if row.get("prediction"):
        parts.append(f"P(COVID-19) {num('covid_probability'):.3f} -> {row['prediction']}")
    notes = "".join(f"\n    note: {n}" for n in str(row.get("input_notes") or "").split(" | ") if n)
    return f"  {row['scan_id']}: " + ", ".join(parts) + notes


def run(args) -> int:
    from ctcovid.running.distributed import torchrun_world

    world = torchrun_world()
    if world is not None:  # launched by torchrun with WORLD_SIZE > 1: this process runs one shard
        return run_distributed(args, world)
    scans = discover(args)
    if isinstance(scans, int):
        return scans
    return predict_scans(args, scans)


def discover(args):
    """The scans of ``args.inputs``, or an exit code after printing why there are none."""
    from ctcovid.io.errors import InputNotFoundError
    from ctcovid.running.scans import discover_scans

    try:
        return discover_scans(args.inputs)
    except (InputNotFoundError, FileNotFoundError) as e:
        error("predict", str(e))
        return EXIT_USAGE


def output_folder_ok(command: str, out) -> bool:
    """Check ``out`` can be created and written before any model loads; print one line and return False if not."""
    from ctcovid.io.atomic import OutputFolderError, check_output_folder

    try:
        check_output_folder(out)
    except OutputFolderError as e:
        error(command, str(e))
        return False
    return True


def predict_scans(args, scans, summary_name: str = "summary.csv", verbose: bool = True) -> int:
    """Load the pipeline and run it on ``scans``; returns the exit code."""
    if not output_folder_ok("predict", args.out):
        return EXIT_USAGE
    pipeline = build_pipeline(args, "predict", skip_missing=not args.require_all, allow_2d=args.allow_2d)
    if isinstance(pipeline, int):
        return pipeline
    if verbose:
        for stage, why in pipeline.skipped_stages().items():
            print(f"{stage}: not run ({why})", file=sys.stderr)
    return run_and_report(args, "predict", scans, pipeline, summary_name=summary_name)


def run_distributed(args, world) -> int:
    """One rank of ``torchrun ... -m ctcovid predict``: see :mod:`ctcovid.running.distributed`."""
    from ctcovid.ct import CTResult
    from ctcovid.running.distributed import run_sharded

    def run_shard(scans, device: str, summary_name: str) -> int:
        # progress bars and stage notes from rank 0 only: N interleaved bars are unreadable
        shard_args = argparse.Namespace(
            **{**vars(args), "device": device, "no_progress": args.no_progress or not world.is_main}
        )
        return predict_scans(shard_args, scans, summary_name=summary_name, verbose=world.is_main)

    try:
        return run_sharded(
            world,
            args.out,
            args.device,
            plan=lambda: discover(args),
            run_shard=run_shard,
            summary_fields=CTResult.SUMMARY_FIELDS,
            cost_out_dir=None if args.force else args.out,
            failed_code=EXIT_SCANS_FAILED,
        )
    except ValueError as e:  # this rank has no GPU of its own
        error("predict", str(e))
        return EXIT_USAGE
