"""ctcovid's lung segmentation next to lungmask's R231 path, one run, same scan, same CPU (issue 16, item 8).

Scan: COVID-CT-MD ``normal002`` (167-slice JPEG-lossless DICOM series, HU). Each side runs in a fresh child
process and reports:

- ``import_s``: importing what its command line imports (``ctcovid.ct`` / ``lungmask`` + SimpleITK);
- ``model_load_s``: building the networks and loading weights (ctcovid: ``CTCovidPipeline`` with the shipped
  bundles; lungmask: ``LMInferer`` with a *randomly initialised* R231 U-Net saved to a local file -- its
  weights cannot be downloaded here; the FLOPs are the same, the mask is meaningless);
- ``read_s``: reading the series (ctcovid: ``CTCovidPipeline.read``; lungmask: SimpleITK's
  ``ImageSeriesReader``, its documented way in), median of 2;
- ``segment_s``: lung masks from the read volume, median of 2 after one warm-up (ctcovid: normalisation,
  the Attention U-Net on every slice, 3D clean-up -- stage timings of ``process`` runs, lesion stage
  excluded; lungmask: ``LMInferer.apply``: its preprocessing, R231 at 256x256, postprocessing);
- a plain SimpleITK series read in its own process, the reference for "read as fast as the peers".

lungmask is not a dependency of ctcovid: install it beside (``pip install lungmask``) and point ``--lungmask-python``
at that interpreter. Results: ``benchmarks/results/peer_lungmask.json``.

    python benchmarks/bench_peer_lungmask.py --lungmask-python /tmp/lmvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = Path(os.environ.get("CTCOVID_DATA", ROOT.parent / "shared" / "data")).resolve()
SERIES = DATA / "ct" / "covid_ct_md" / "normal002"
LUNG_STAGES = ("normalize", "segmentation", "mask_cleanup")


def _median_of(fn, n: int = 2) -> tuple[float, object]:
    times, out = [], None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _sitk_read_series(sitk):
    """The series through SimpleITK's ``ImageSeriesReader`` (``sitk``: the module, imported by the timed caller)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(SERIES)))
    return reader.Execute()


def child_ours() -> dict:
    t = time.perf_counter()
    from ctcovid.ct import CTCovidPipeline

    import_s = time.perf_counter() - t
    t = time.perf_counter()
    pipe = CTCovidPipeline(device="cpu", flush_denormal=True)
    load_s = time.perf_counter() - t
    read_s, volume = _median_of(lambda: pipe.read(SERIES))
    runs = []
    for _ in range(3):  # one warm-up, two timed
        res = pipe.process(pipe.read(SERIES))
        runs.append(sum(res.timings_s.get(k, 0.0) for k in LUNG_STAGES))
    return {"import_s": import_s, "model_load_s": load_s, "read_s": read_s, "segment_s": statistics.median(runs[1:]),
            "lung_volume_ml": res.lung_volume_ml, "threads": __import__("torch").get_num_threads()}


def child_lungmask(weights: str) -> dict:
    t = time.perf_counter()
    import SimpleITK as sitk
    from lungmask import LMInferer

    import_s = time.perf_counter() - t
    t = time.perf_counter()
    inferer = LMInferer(modelpath=weights, force_cpu=True, tqdm_disable=True)
    load_s = time.perf_counter() - t

    read_s, image = _median_of(lambda: _sitk_read_series(sitk))
    inferer.apply(image)  # warm-up
    seg_s, _ = _median_of(lambda: inferer.apply(image))
    return {"import_s": import_s, "model_load_s": load_s, "read_s": read_s, "segment_s": seg_s,
            "threads": __import__("torch").get_num_threads()}


def child_sitk() -> dict:
    t = time.perf_counter()
    import SimpleITK as sitk

    import_s = time.perf_counter() - t

    read_s, _ = _median_of(lambda: _sitk_read_series(sitk))
    return {"import_s": import_s, "read_s": read_s}


def random_r231(path: Path, python: str) -> None:
    """A randomly initialised R231 U-Net (lungmask's own class and settings) saved as a state dict."""
    code = (
        "import torch, sys; from lungmask.resunet import UNet; torch.manual_seed(0); "
        "m = UNet(n_classes=3, padding=True, depth=5, up_mode='upsample', batch_norm=True, residual=False); "
        "torch.save(m.state_dict(), sys.argv[1])"
    )
    subprocess.run([python, "-c", code, str(path)], check=True)


def _run_child(python: str, *args: str) -> dict:
    print(f"running {args[0]} ...", file=sys.stderr, flush=True)
    out = subprocess.run([python, __file__, "--child", *args], check=True, capture_output=True, text=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {result}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lungmask-python", required=False, default=None)
    p.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(HERE / "results" / "peer_lungmask.json"))
    args = p.parse_args(argv)
    if args.child:
        kind = args.child[0]
        result = child_ours() if kind == "ours" else child_sitk() if kind == "sitk" else child_lungmask(args.child[1])
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
        return 0
    if args.lungmask_python is None:
        p.error("--lungmask-python: an interpreter with lungmask installed (pip install lungmask)")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "r231_random.pth"
        random_r231(weights, args.lungmask_python)
        sitk_read = _run_child(sys.executable, "sitk")
        ours = _run_child(sys.executable, "ours")
        peer = _run_child(args.lungmask_python, "lungmask", str(weights))
    ratio = {k: round(peer[k] / ours[k], 2) for k in ("import_s", "model_load_s", "read_s", "segment_s")}
    result = {
        "benchmark": "peer_lungmask",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "scan": "COVID-CT-MD normal002, 512x512x167 JPEG-lossless DICOM, HU",
        "cpu_cores": os.cpu_count(),
        "ctcovid": ours,
        "lungmask_r231_random_weights": peer,
        "plain_simpleitk_series_read": sitk_read,
        "lungmask_over_ctcovid": ratio,
        "notes": [
            "each side in a fresh process; read_s and segment_s are medians of 2 (segment after one warm-up)",
            "ctcovid segment_s = normalize + segmentation + mask_cleanup stage seconds (lesion stage excluded)",
            "lungmask: random R231 weights (cannot be downloaded here): same FLOPs, meaningless mask",
        ],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, args.out)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
