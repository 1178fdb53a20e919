"""``ctcovid cxr``: the Cascade-SEME chest X-ray cascade (predict, calibrate the viral threshold, evaluate)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK = 0  # every image ok
EXIT_IMAGES_FAILED = 1  # the run finished but at least one image failed (see summary.csv)
EXIT_USAGE = 2  # bad arguments (nothing was run)
EXIT_MODELS = 3  # no trained weights / no stored threshold / broken bundle (the message says which)
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}    all images ok
  {EXIT_IMAGES_FAILED}    some images failed (status and reason in summary.csv); the others were processed
  {EXIT_USAGE}    usage error (bad option, an output folder that cannot be written); nothing was run
  {EXIT_MODELS}    a model or the viral threshold is missing (the message says which bundle and how to make it)
  {EXIT_INTERRUPTED}  interrupted; the images done so far are in --out"""


def _size(text: str) -> list[int]:
    """``512`` or ``512x448`` -> ``[512, 512]`` / ``[512, 448]``."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 32:
        raise argparse.ArgumentTypeError(f"expected N or HxW with sides >= 32, got {text!r}")
    return values


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle-dir", default=None, help="folder holding the bundles (default: the package's bundles/)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--spatial-size",
        type=_size,
        default=None,
        help="network input size N or HxW (default: stage 1 the size stored with the threshold, else the "
        "bundle config's 512); use the size the weights were trained at",
    )


def _cascade_options(p: argparse.ArgumentParser, threshold_help: str) -> None:
    """Options of the sub-commands that load the whole cascade (predict, evaluate)."""
    _common(p)
    p.add_argument("--stage2-spatial-size", type=_size, default=None, help="stage-2 input size (default: --spatial-size)")
    p.add_argument("--threshold-file", default=None, help=threshold_help)


def _subcommand(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A ``ctcovid cxr`` sub-command parser with the exit codes in its epilog."""
    return sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cxr",
        help="chest X-ray Cascade-SEME: normal / bacterial / viral, then COVID-19 / other viral",
        description="Chest X-ray cascade (Cascade-SEME). Sub-commands: predict, calibrate, evaluate.",
    )
    sub = p.add_subparsers(dest="cxr_command", metavar="SUBCOMMAND")

    pp = _subcommand(
        sub,
        "predict",
        help="run the cascade on radiographs (PNG, JPEG, DICOM)",
        description=(
            "Stage 1 gives P(normal, bacterial, viral); images whose viral probability is above the stored "
            "threshold go to stage 2 (COVID-19 / other viral). Writes <id>.json and <id>_gradcam.png per image "
            "and summary.csv into --out. An unreadable image gets a failed row with the reason; the run goes on. "
            "Re-running resumes: images done with the same content, weights and options are not recomputed."
        ),
    )
    pp.add_argument("images", nargs="+", metavar="IMAGE", help="radiograph files, or folders of them")
    pp.add_argument("--out", "-o", required=True, help="output folder (created)")
    _cascade_options(pp, "viral threshold JSON (default: stage-1 bundle's models/viral_threshold.json)")
    pp.add_argument("--no-gradcam", action="store_true", help="skip the Grad-CAM overlays (faster)")
    pp.add_argument(
        "--force", action="store_true", help="recompute images already done with the same content, weights and options"
    )
    pp.set_defaults(func=run_predict)

    pc = _subcommand(
        sub,
        "calibrate",
        help="compute and store the viral threshold Th_Vir (mean stage-1 viral probability on a calibration set)",
        description=(
            "Runs the stage-1 bundle's configs/train.json + configs/calibrate.json: the trained stage-1 network "
            "on the calibration part of its datalist; writes models/viral_threshold.json (value, calibration "
            "set, weights hash, date) and models/calibration_report.json."
        ),
    )
    _common(pc)
    pc.add_argument("--data-root", default=None, help="Kermany folder (default: ../shared/data/cxr/kermany or $CTCOVID_DATA)")
    pc.add_argument("--split", default="calibration", help="datalist part to calibrate on (default: calibration)")
    pc.add_argument("--limit", type=_positive, default=None, help="use a class-balanced subset of this many images")
    pc.add_argument("--only-viral", action="store_true", help="average over the viral calibration images only")
    pc.set_defaults(func=run_calibrate)

    pe = _subcommand(
        sub,
        "evaluate",
        help="evaluate the whole cascade (4 classes) on the held-out test patients of both datalists",
        description=(
            "Runs the cascade on the test parts of both bundles' datalists (Kermany: normal / bacterial / "
            "viral -> viral-other; ieee8023: COVID-19 / viral-other) and writes report.json, predictions.csv, "
            "confusion_matrix.png and roc.png into --out."
        ),
    )
    pe.add_argument("--out", "-o", required=True, help="output folder (created)")
    _cascade_options(pe, "viral threshold JSON")
    pe.add_argument("--data-dir", default=None, help="shared data folder holding cxr/kermany and cxr/ieee8023")
    pe.add_argument("--limit", type=_positive, default=None, help="class-balanced subset of this many images per dataset")
    pe.set_defaults(func=run_evaluate)

    pm = _subcommand(
        sub,
        "lung-masks",
        help="predict lung masks (cxr_lung_segmentation) for a cascade bundle's datalist, for regional learning "
        "or lung-box crops",
        description=(
            "Writes <mask-root>/<image relative path>.png for every image of the chosen datalist parts, as "
            "configs/train_regional.json and stage 1's configs/train_lungbox.json expect (--mask_root)."
        ),
    )
    pm.add_argument(
        "--stage", choices=("1", "2", "adult"), required=True,
        help="1: Kermany datalist, 2: ieee8023 datalist, adult: stage 1's children + adults datalist (datalist_adult.json)",
    )
    pm.add_argument("--mask-root", required=True, help="output folder for the masks")
    pm.add_argument("--parts", default="training", help="comma-separated datalist parts (default: training)")
    pm.add_argument(
        "--data-root", default=None,
        help="dataset folder (default: ../shared/data/cxr/<dataset>; ../shared/data/cxr for --stage adult)",
    )
    pm.add_argument("--bundle-dir", default=None, help="folder holding the bundles")
    pm.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    pm.set_defaults(func=run_lung_masks)

    pf = sub.add_parser(
        "f-test",
        help="F-test between two models' evaluation reports on the same images",
        description=(
            "F = var(A) / var(B) of the per-image probability each model gives to the true class, with a "
            "two-sided p-value (scipy F distribution). Inputs: report.json files of evaluate.json runs."
        ),
    )
    pf.add_argument("report_a", help="report.json of model A")
    pf.add_argument("report_b", help="report.json of model B (same images)")
    pf.add_argument("--alternative", choices=("two-sided", "greater", "less"), default="two-sided")
    pf.add_argument("--out", default=None, help="also write the result as JSON here")
    pf.set_defaults(func=run_f_test)

    p.set_defaults(func=lambda args: (p.print_help(), EXIT_USAGE)[1])
    return p


def _error(message: str) -> None:
    print(f"ctcovid cxr: error: {message}", file=sys.stderr)


def _load_cascade(args):
    from ctcovid.bundle.loading import BundleError, MissingWeightsError
    from ctcovid.cxr.cascade import CXRCascade
    from ctcovid.cxr.evaluation import ThresholdFileError

    try:
        cascade = CXRCascade.from_bundles(
            bundle_dir=args.bundle_dir,
            device=args.device,
            threshold_file=args.threshold_file,
            spatial_size=args.spatial_size,
            stage2_spatial_size=args.stage2_spatial_size,
        )
    except (MissingWeightsError, ThresholdFileError, BundleError) as e:
        _error(str(e))
        return EXIT_MODELS
    except (ValueError, RuntimeError) as e:  # unknown or unavailable device
        _error(str(e))
        return EXIT_USAGE
    for w in cascade.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return cascade


def _expand(images: list[str]) -> list[str]:
    from ctcovid.cxr.datalists import image_datalist

    out: list[str] = []
    for item in images:
        if Path(item).is_dir():
            found = [d["image"] for d in image_datalist(item)]
            out.extend(found if found else [item])  # an empty folder becomes a failed row, not silence
        else:
            out.append(item)
    return out


def run_predict(args) -> int:
    from ctcovid.cxr.runs import run_cascade
    from ctcovid.io.atomic import OutputFolderError, check_output_folder

    try:
        check_output_folder(args.out)
    except OutputFolderError as e:
        _error(str(e))
        return EXIT_USAGE
    cascade = _load_cascade(args)
    if isinstance(cascade, int):
        return cascade
    images = _expand(args.images)

    def progress(i: int, n: int, row: dict) -> None:
        tail = f"FAILED: {row['reason']}" if row["status"] == "failed" else row["label"]
        print(f"[{i}/{n}] {row['image']}: {tail}", file=sys.stderr)

    try:
        report = run_cascade(
            cascade, images, args.out, gradcam=not args.no_gradcam, progress=progress, force=args.force
        )
    except KeyboardInterrupt:
        _error(f"interrupted; finished images are in {args.out}")
        return EXIT_INTERRUPTED
    print(
        f"{report.ok} ok ({report.reused} reused from an earlier run), {report.failed} failed -> {report.summary_path}"
    )
    return EXIT_IMAGES_FAILED if report.failed else EXIT_OK


def run_calibrate(args) -> int:
    from monai.bundle import run as bundle_run

    from ctcovid.bundle import bundles_root
    from ctcovid.cxr.cascade import STAGE1_BUNDLE
    from ctcovid.cxr.evaluation import read_viral_threshold
    from ctcovid.cxr.stage import trained_lung_box_margin

    root = Path(args.bundle_dir).expanduser().resolve() if args.bundle_dir else bundles_root()
    bdir = root / STAGE1_BUNDLE
    if not (bdir / "models" / "model.pt").is_file():
        _error(f"no trained stage-1 weights at {bdir / 'models' / 'model.pt'}; train {STAGE1_BUNDLE} first "
               f"(python -m monai.bundle run --config_file {bdir / 'configs' / 'train.json'})")
        return EXIT_MODELS
    overrides: dict = {"bundle_root": str(bdir), "calibration_split": args.split, "num_workers": 0}
    if args.data_root:
        overrides["data_root"] = args.data_root
    if args.spatial_size:
        overrides["spatial_size"] = args.spatial_size
    if args.limit:
        overrides["val_limit"] = args.limit
    if args.only_viral:
        overrides["calibration_only_class"] = 2
    if args.device != "auto":
        overrides["device"] = f"$torch.device('{args.device}')"
    configs = [str(bdir / "configs" / "train.json"), str(bdir / "configs" / "calibrate.json")]
    margin = trained_lung_box_margin(bdir)
    if margin is not None:  # weights trained on lung-box crops are calibrated on the same crops
        configs.insert(1, str(bdir / "configs" / "train_lungbox.json"))
        overrides["lung_box_margin"] = margin
    bundle_run(config_file=configs, logging_file=str(bdir / "configs" / "logging.conf"), **overrides)
    record = read_viral_threshold(bdir / "models" / "viral_threshold.json")
    print(f"Th_Vir = {record['viral_threshold']:.6f} over {record['num_images']} images "
          f"({record['calibration_set']}) -> {bdir / 'models' / 'viral_threshold.json'}")
    return EXIT_OK


def run_evaluate(args) -> int:
    from ctcovid.bundle import bundles_root
    from ctcovid.cxr import STAGE1_BUNDLE, STAGE2_BUNDLE, evaluate_cascade
    from ctcovid.cxr.datalists import STAGE1_CLASSES, STAGE2_CLASSES, default_data_root, load_datalist

    cascade = _load_cascade(args)
    if isinstance(cascade, int):
        return cascade
    root = Path(args.bundle_dir).expanduser().resolve() if args.bundle_dir else bundles_root()
    data = Path(args.data_dir) if args.data_dir else Path(default_data_root())
    items = []
    for bundle, sub, names, mapping in (
        (STAGE1_BUNDLE, "kermany", STAGE1_CLASSES, {"normal": "normal", "bacterial": "bacterial", "viral": "viral-other"}),
        (STAGE2_BUNDLE, "ieee8023", STAGE2_CLASSES, {"COVID-19": "COVID-19", "viral-other": "viral-other"}),
    ):
        dl = load_datalist(root / bundle / "configs" / "datalist.json", "test", data / "cxr" / sub, limit=args.limit)
        items += [{"image": it["image"], "name": f"{sub}/{it['name']}", "label": mapping[names[it["label"]]]} for it in dl]
    def progress(done: int, total: int) -> None:
        if done % 25 == 0:
            print(f"[{done}/{total}] images evaluated", file=sys.stderr)

    report = evaluate_cascade(cascade, items, args.out, progress=progress)
    print(f"cascade on {report['num_samples']} test images: accuracy {report['accuracy']:.4f}, "
          f"macro-F1 {report['macro_f1']:.4f} -> {Path(args.out) / 'report.json'}")
    return EXIT_IMAGES_FAILED if report["failed"] else EXIT_OK


def run_lung_masks(args) -> int:
    from ctcovid.bundle import bundles_root
    from ctcovid.bundle.loading import BundleError, MissingWeightsError
    from ctcovid.cxr.cascade import STAGE1_BUNDLE, STAGE2_BUNDLE
    from ctcovid.cxr.datalists import default_data_root, load_datalist
    from ctcovid.cxr.masks import predict_lung_masks

    # (bundle, datalist file, dataset folder under the data root; the adult datalist spans both datasets)
    bundle, datalist, dataset = {
        "1": (STAGE1_BUNDLE, "datalist.json", ("kermany",)),
        "2": (STAGE2_BUNDLE, "datalist.json", ("ieee8023",)),
        "adult": (STAGE1_BUNDLE, "datalist_adult.json", ()),
    }[str(args.stage)]
    root = Path(args.bundle_dir).expanduser().resolve() if args.bundle_dir else bundles_root()
    data_root = args.data_root or default_data_root("cxr", *dataset)
    items = []
    try:
        for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
            items += load_datalist(root / bundle / "configs" / datalist, part, data_root)
    except KeyError as e:
        _error(str(e))
        return EXIT_USAGE
    try:
        counts = predict_lung_masks(items, args.mask_root, bundle_dir=args.bundle_dir, device=args.device)
    except (MissingWeightsError, BundleError) as e:
        _error(str(e))
        return EXIT_MODELS
    adult = "'train_adult.json'," if str(args.stage) == "adult" else ""
    print(f"{counts['written']} masks written, {counts['existing']} already there, {counts['failed']} failed "
          f"-> {args.mask_root}; train with --config_file \"['train.json',{adult}'train_regional.json']\" "
          f"--mask_root {args.mask_root} (stage 1: or 'train_lungbox.json' for lung-box crops)")
    return EXIT_IMAGES_FAILED if counts["failed"] else EXIT_OK


def run_f_test(args) -> int:
    import json

    from ctcovid.cxr.evaluation import compare_reports_f_test
    from ctcovid.io.atomic import write_json_atomic

    try:
        result = compare_reports_f_test(args.report_a, args.report_b, alternative=args.alternative)
    except (OSError, ValueError, KeyError) as e:
        _error(f"cannot compare the reports: {e}")
        return EXIT_USAGE
    print(json.dumps(result, indent=2))
    if args.out:
        write_json_atomic(result, args.out)
    return EXIT_OK
