"""Peak memory and time of ``ctcovid predict`` on a 1000-slice CT (issue 15, item 4: keep it under 4 GB).

The scan: COVID-CT-MD ``normal002`` (512x512x167, 2 mm, HU) interpolated linearly along z to 1000 slices
(0.334 mm: the voxel count of a 1000-slice thin-slice chest CT, real anatomy), stored as int16 NIfTI in
``--workdir`` (made once, reused). Each configuration runs ``python -m ctcovid predict`` in a fresh child
process, as a user would; peak memory is the child's maximum resident set (``getrusage``), and a sampler
reads its resident set every 0.1 s so the peak can be placed on the pipeline's stage timeline (the
scan's JSON records stage seconds). Results go to ``benchmarks/results/ct_large_scan.json``.

    python benchmarks/bench_large_scan.py [--workdir /tmp/ctcovid-large] [--precisions fp32 bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = Path(os.environ.get("CTCOVID_DATA", ROOT.parent / "shared" / "data")).resolve()
GIB = 2**30
N_SLICES = 1000


def make_scan(workdir: Path) -> Path:
    """normal002 resampled to 1000 slices, int16 HU NIfTI (written once, atomically)."""
    out = workdir / "normal002_1000.nii.gz"
    if out.is_file():
        return out
    import nibabel as nib
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from ctcovid.io.ct import load_ct

    img = load_ct(DATA / "ct" / "covid_ct_md" / "normal002")  # (1, X, Y, Z) HU, affine index -> RAS
    vol = img.as_tensor()[0].float()
    affine = np.asarray(img.affine, dtype=float)
    n = vol.shape[-1]
    big = torch.nn.functional.interpolate(
        vol[None, None], size=(*vol.shape[:2], N_SLICES), mode="trilinear", align_corners=True
    )[0, 0]
    affine[:3, 2] *= (n - 1) / (N_SLICES - 1)
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / ".normal002_1000.tmp.nii.gz"
    nib.save(nib.Nifti1Image(big.round().to(torch.int16).numpy(), affine), tmp)
    os.replace(tmp, out)
    return out


def _sample_rss(pid: int, samples: list, stop: threading.Event) -> None:
    t0 = time.perf_counter()
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    samples.append((round(time.perf_counter() - t0, 2), int(line.split()[1]) / 2**20))
        except OSError:
            return
        stop.wait(0.1)


def run_predict(scan: Path, precision: str, extra: list[str]) -> dict:
    """One ``ctcovid predict`` in a child; its wall time, peak RSS, RSS timeline and stage seconds."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "ctcovid",
            "predict",
            str(scan),
            "--out",
            out,
            "--device",
            "cpu",
            "--precision",
            precision,
            "--no-progress",
            *extra,
        ]
        samples: list = []
        stop = threading.Event()
        t = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = threading.Thread(target=_sample_rss, args=(child.pid, samples, stop), daemon=True)
        sampler.start()
        log, _ = child.communicate()
        wall = time.perf_counter() - t
        stop.set()
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB; max over children
        result = json.loads(next(Path(out).glob("*.json")).read_text()) if child.returncode == 0 else {}
    timing = result.get("timings_s", {})
    infection = result.get("infection") or {}
    top = max(samples, key=lambda s: s[1]) if samples else None
    return {
        "precision": precision,
        "options": extra,
        "returncode": child.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak, 3),
        "peak_at_s": top[0] if top else None,
        "rss_timeline_gib": [[s, round(r, 2)] for s, r in samples[:: max(1, len(samples) // 60)]],
        "stage_seconds": timing,
        "lung_volume_ml": result.get("lung_volume_ml"),
        "lung_involvement_percent": infection.get("lung_involvement_percent"),
        "ct_severity_grade": infection.get("ct_severity_grade"),
        "log_tail": log.splitlines()[-3:],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ctcovid-large"))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--extra", nargs="*", default=[], help="more ctcovid predict options, e.g. --no-gradcam")
    p.add_argument("--out", default=str(HERE / "results" / "ct_large_scan.json"))
    args = p.parse_args(argv)
    scan = make_scan(Path(args.workdir))
    runs = [run_predict(scan, prec, args.extra) for prec in args.precisions]
    result = {
        "benchmark": "ct_large_scan",
        "command": "python benchmarks/bench_large_scan.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "scan": {
            "source": "COVID-CT-MD normal002 interpolated along z",
            "shape": [512, 512, N_SLICES],
            "file_mib": round(scan.stat().st_size / 2**20, 1),
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        },
        "target": "peak resident memory < 4 GiB (issue 15)",
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    for r in runs:
        print(
            r["precision"],
            r["options"],
            "rc",
            r["returncode"],
            "wall",
            r["wall_s"],
            "s peak",
            r["peak_rss_gib"],
            "GiB at",
            r["peak_at_s"],
            "s;",
            r["stage_seconds"],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
