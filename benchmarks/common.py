"""Inputs shared by the CT benchmarks: a synthetic chest CT series and bundles with random weights.

- :func:`write_synthetic_ct_series`: an uncompressed DICOM CT series of a simple chest phantom (body,
  two lungs with vessel-like blobs, a spine disc) in Hounsfield units, deterministic for a seed. It lets
  the benchmarks time a 300-slice 512x512 scan that no data set here provides, and the tests run the
  pipeline on a scan whose anatomy is known.
- :func:`random_weight_bundles`: a copy of the CT bundles in which every network that ships no trained
  weights gets randomly initialised ones, so :class:`ctcovid.ct.CTCovidPipeline` loads all four
  stages. For benchmarking only: random weights cost exactly the FLOPs of trained ones, but the outputs
  mean nothing.

Nothing here is part of the package; the benchmark scripts and ``tests/test_benchmark_baseline.py`` import
it with ``benchmarks/`` on ``sys.path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CT_BUNDLES",
    "save_result",
    "PHANTOM",
    "Phantom",
    "lung_slice_indices",
    "random_weight_bundles",
    "write_synthetic_ct_series",
]

#: The four CT pipeline bundles, in run order.
CT_BUNDLES = (
    "ct_lung_slice_filter",
    "ct_lung_segmentation",
    "ct_covid_classification",
    "ct_covid_severity_classification",
)


@dataclass(frozen=True)
class Phantom:
    """Geometry and HU values of the synthetic chest, in image coordinates normalised by the image size.

    A pixel at row ``r``, column ``c`` of a ``size`` x ``size`` slice has ``u = (c + 0.5) / size - 0.5``
    (left-right, along DICOM rows) and ``v = (r + 0.5) / size - 0.5`` (anterior-posterior, down the image),
    so the same phantom is drawn at any matrix size. The lungs are drawn on slices ``t`` in
    ``[lung_start, lung_end]`` (``t = k / (n_slices - 1)``) with semi-axes ``lung_axes`` scaled by
    ``lung_min_scale + (1 - lung_min_scale) * sin(pi * (t - lung_start) / (lung_end - lung_start))``.
    """

    body_axes: tuple[float, float] = (0.42, 0.30)
    lung_centers: tuple[tuple[float, float], ...] = ((-0.17, -0.02), (0.17, -0.02))
    lung_axes: tuple[float, float] = (0.11, 0.17)
    lung_start: float = 0.15
    lung_end: float = 0.85
    lung_min_scale: float = 0.45
    spine_center: tuple[float, float] = (0.0, 0.20)
    spine_radius: float = 0.05
    vessels_per_lung: int = 8
    air_hu: float = -1000.0
    tissue_hu: float = 40.0
    lung_hu: float = -850.0
    bone_hu: float = 700.0
    noise_hu: tuple[float, float, float] = (5.0, 15.0, 25.0)  # std in air, soft tissue/bone, lung

    def lung_scale(self, t: float) -> float:
        """Scale of the lung cross-section at slice position ``t`` in [0, 1]; 0 where there is no lung."""
        if not self.lung_start <= t <= self.lung_end:
            return 0.0
        phase = np.pi * (t - self.lung_start) / (self.lung_end - self.lung_start)
        return float(self.lung_min_scale + (1.0 - self.lung_min_scale) * np.sin(phase))


#: The phantom :func:`write_synthetic_ct_series` draws.
PHANTOM = Phantom()

#: RescaleIntercept of the written series: stored value = HU + 1024 (slope 1), so -1024 HU is stored as 0.
_INTERCEPT = -1024.0


def lung_slice_indices(n_slices: int, phantom: Phantom = PHANTOM) -> list[int]:
    """Indices of the slices on which the phantom has lungs (the central ~70 %)."""
    ts = np.linspace(0.0, 1.0, n_slices) if n_slices > 1 else np.zeros(1)
    return [k for k, t in enumerate(ts) if phantom.lung_scale(float(t)) > 0]


def _ellipse(u: np.ndarray, v: np.ndarray, center: Sequence[float], axes: Sequence[float]) -> np.ndarray:
    return ((u - center[0]) / axes[0]) ** 2 + ((v - center[1]) / axes[1]) ** 2 <= 1.0


def _phantom_slice(
    u: np.ndarray,
    v: np.ndarray,
    t: float,
    vessels: np.ndarray,
    noise: np.ndarray,
    phantom: Phantom,
) -> np.ndarray:
    """One ``(size, size)`` float32 HU slice (rows, columns) at slice position ``t``.

    ``vessels`` is ``(n, 5)``: lung index, centre offset (du, dv) in lung-radius units, radius, phase.
    """
    size = u.shape[1]
    body = _ellipse(u, v, (0.0, 0.0), phantom.body_axes)
    hu = np.where(body, np.float32(phantom.tissue_hu), np.float32(phantom.air_hu))
    sigma = np.where(body, np.float32(phantom.noise_hu[1]), np.float32(phantom.noise_hu[0]))
    bone = _ellipse(u, v, phantom.spine_center, (phantom.spine_radius,) * 2)
    hu[bone] = phantom.bone_hu
    scale = phantom.lung_scale(t)
    if scale > 0:
        axes = (phantom.lung_axes[0] * scale, phantom.lung_axes[1] * scale)
        lung = np.zeros_like(body)
        for center in phantom.lung_centers:
            lung |= _ellipse(u, v, center, axes)
        lung &= body
        hu[lung] = phantom.lung_hu
        sigma[lung] = phantom.noise_hu[2]
        # vessel-like blobs: discs drifting slowly with t, drawn only inside the lungs, evaluated in their
        # bounding boxes (a few hundred pixels each) rather than over the whole slice
        for idx, du, dv, radius, phase in vessels:
            cu = phantom.lung_centers[int(idx)][0] + axes[0] * (du + 0.15 * np.sin(2 * np.pi * t + phase))
            cv = phantom.lung_centers[int(idx)][1] + axes[1] * (dv + 0.15 * np.cos(2 * np.pi * t + phase))
            c0, r0 = (cu + 0.5) * size - 0.5, (cv + 0.5) * size - 0.5
            half = int(np.ceil(radius * size)) + 1
            rs = slice(max(int(r0) - half, 0), min(int(r0) + half + 2, size))
            cs = slice(max(int(c0) - half, 0), min(int(c0) + half + 2, size))
            blob = _ellipse(u[rs, cs], v[rs, cs], (cu, cv), (radius, radius)) & lung[rs, cs]
            hu[rs, cs][blob] = np.float32(-60.0 + 100.0 * (phase / (2 * np.pi)))  # -60..40 HU
    hu += noise * sigma
    return hu


def write_synthetic_ct_series(
    out_dir: str | os.PathLike,
    n_slices: int = 300,
    size: int = 512,
    spacing: Sequence[float] = (0.7, 0.7, 1.0),
    seed: int = 0,
) -> Path:
    """Write a synthetic chest CT as an uncompressed DICOM series, one file per slice.

    The phantom (:data:`PHANTOM`): air (-1000 HU) around an elliptical body of soft tissue (~40 HU), a
    spine disc (~700 HU) and, on the central ~70 % of slices (:func:`lung_slice_indices`), two lungs
    (~-850 HU) holding small vessel-like blobs (-60..40 HU) whose cross-section grows and shrinks smoothly
    with the slice; the end slices have no lung. Gaussian noise is added (5 / 15 / 25 HU in air / tissue /
    lung). Pixels are stored as int16 with RescaleSlope 1 and RescaleIntercept -1024, so the values read
    back are HU; Modality CT, ImageType ORIGINAL/PRIMARY/AXIAL, axial ImageOrientationPatient, one
    SeriesInstanceUID, ImagePositionPatient stepping by ``spacing[2]`` along +z. Everything, UIDs
    included, is a function of the arguments: the same call writes the same bytes.

    Args:
        out_dir: folder to write into (created; must not hold another series).
        n_slices: number of slices ``Z``.
        size: rows = columns of each slice.
        spacing: ``(x, y, z)`` mm: column spacing, row spacing, slice step (``SliceThickness`` too), the
            ``(X, Y, Z)`` spacing :func:`ctcovid.io.load_ct` reports.
        seed: noise and vessel layout.

    Returns:
        ``out_dir``; ``ctcovid.io.load_ct(out_dir)`` reads it as a ``(1, size, size, n_slices)`` HU volume
        in which ``volume[0, c, r, k]`` is row ``r``, column ``c`` of slice ``k``.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    if n_slices < 2 or size < 16:
        raise ValueError(f"need n_slices >= 2 and size >= 16, got {n_slices} and {size}")
    sx, sy, sz = (float(s) for s in spacing)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    phantom = PHANTOM
    n_vessels = phantom.vessels_per_lung * len(phantom.lung_centers)
    angle = rng.uniform(0, 2 * np.pi, n_vessels)
    dist = 0.65 * np.sqrt(rng.uniform(0, 1, n_vessels))  # inside the lung ellipse, away from its rim
    vessels = np.stack(
        [
            np.repeat(np.arange(len(phantom.lung_centers)), phantom.vessels_per_lung),
            dist * np.cos(angle),
            dist * np.sin(angle),
            rng.uniform(0.006, 0.014, n_vessels),  # radius, fraction of the image size
            rng.uniform(0, 2 * np.pi, n_vessels),  # phase of the drift (and the blob's HU)
        ],
        axis=1,
    )
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    u, v = np.meshgrid(grid, grid)  # (rows, columns): u varies along a row, v down a column

    tag = f"ctcovid-synthetic-ct:{seed}:{n_slices}:{size}:{sx}:{sy}:{sz}"
    study_uid = generate_uid(entropy_srcs=[tag, "study"])
    series_uid = generate_uid(entropy_srcs=[tag, "series"])
    frame_uid = generate_uid(entropy_srcs=[tag, "frame"])
    origin = (-(size / 2) * sx, -(size / 2) * sy, -(n_slices / 2) * sz)
    legacy = int(pydicom.__version__.split(".")[0]) < 3

    for k in range(n_slices):
        t = k / (n_slices - 1)
        noise = rng.standard_normal((size, size), dtype=np.float32)
        hu = _phantom_slice(u, v, t, vessels, noise, phantom)
        stored = np.clip(np.rint(hu - _INTERCEPT), 0, 32767).astype(np.int16)

        sop_uid = generate_uid(entropy_srcs=[tag, "slice", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        if legacy:  # pydicom 2 needs the encoding on the dataset; pydicom 3 takes it from the transfer syntax
            ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName = "Synthetic^Phantom"
        ds.PatientID = f"SYNTH{seed:04d}"
        ds.SeriesDescription = "ctcovid synthetic chest phantom"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{origin[0]:.4f}", f"{origin[1]:.4f}", f"{origin[2] + k * sz:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{origin[2] + k * sz:.4f}"
        ds.PixelSpacing = [sy, sx]  # DICOM order: between rows, then between columns
        ds.SliceThickness = sz
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1  # signed
        ds.RescaleSlope = 1
        ds.RescaleIntercept = int(_INTERCEPT)
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = stored.tobytes()
        path = out / f"slice_{k:04d}.dcm"
        if legacy:
            pydicom.dcmwrite(path, ds, write_like_original=False)
        else:
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return out


def _stamp(name: str, src: Path, seed: int, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a random-weight bundle was made from: reused only when all of it matches."""
    config = (src / "configs" / "inference.json").read_bytes()
    return {
        "bundle": name,
        "seed": seed,
        "overrides": dict(overrides or {}),
        "inference_json_sha256": hashlib.sha256(config).hexdigest(),
    }


def random_weight_bundles(
    dst: str | os.PathLike,
    names: Sequence[str] | None = None,
    seed: int = 0,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Copy the CT bundles into ``dst``, giving every network without trained weights random ones.

    For benchmarks only: a randomly initialised network costs exactly the FLOPs (and memory) of the
    trained one, so the pipeline's speed can be measured before every stage is trained, but its
    probabilities mean nothing. A bundle that ships ``models/model.pt`` keeps it (hard link, else copy:
    never write into the copy's ``model.pt``, it may be the shipped file);
    for the others the ``network_def`` of ``configs/inference.json`` is built as
    :func:`ctcovid.bundle.loading.load_stage` builds it (:func:`~ctcovid.bundle.loading.read_bundle_config`
    with ``bundle_root`` set to the copy), under ``torch.manual_seed(seed + i)`` for the i-th bundle named
    (the global RNG state is restored), and its ``state_dict`` saved as ``models/model.pt``. A file
    ``models/random_weights.json`` marks such weights; a later call with the same source config, seed
    and overrides reuses them (building the six Inception severity members takes about half a minute).

    Args:
        dst: folder to hold the bundles (created). ``CTCovidPipeline(bundle_dir=dst)`` then loads all
            four stages.
        names: bundles to copy, default :data:`CT_BUNDLES`, from :func:`ctcovid.bundle.bundles_root`.
        seed: base seed of the random weights.
        overrides: ``{bundle: {config key: value}}`` written into the copy's ``inference.json`` before the
            network is built, for smaller test networks (e.g. ``{"ct_covid_classification":
            {"num_members": 2}}``). A bundle with overrides always gets random weights: its shipped
            checkpoint would not fit the changed network.

    Returns:
        ``dst``.
    """
    import torch

    from ctcovid.bundle import bundles_root
    from ctcovid.bundle.loading import WEIGHTS_FILE, read_bundle_config

    root = Path(dst)
    root.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    names = tuple(CT_BUNDLES if names is None else names)
    unknown = set(overrides) - set(names)
    if unknown:
        raise ValueError(f"overrides name bundles that are not copied: {sorted(unknown)}")
    for i, name in enumerate(names):
        src = bundles_root() / name
        if not (src / "configs" / "inference.json").is_file():
            raise FileNotFoundError(
                f"bundle {name} not found in {bundles_root()} (no configs/inference.json)"
            )
        out = root / name
        weights = out / WEIGHTS_FILE
        stamp_file = out / "models" / "random_weights.json"
        shipped = src / WEIGHTS_FILE
        if shipped.is_file() and name not in overrides:
            if out.exists():
                shutil.rmtree(out)
            shutil.copytree(src, out, ignore=shutil.ignore_patterns("model.pt", "eval", "__pycache__"))
            try:
                os.link(shipped, weights)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(shipped, weights)
            continue

        stamp = _stamp(name, src, seed + i, overrides.get(name))
        if weights.is_file() and stamp_file.is_file():
            try:
                if json.loads(stamp_file.read_text()) == stamp:
                    continue
            except (OSError, ValueError):
                pass
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("model.pt", "eval", "__pycache__"))
        (out / "models").mkdir(exist_ok=True)
        if name in overrides:
            cfg_file = out / "configs" / "inference.json"
            cfg = json.loads(cfg_file.read_text())
            cfg.update(overrides[name])
            cfg_file.write_text(json.dumps(cfg, indent=4))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            network = read_bundle_config(out).get_parsed_content("network_def", instantiate=True)
        torch.save(network.state_dict(), weights)
        stamp_file.write_text(json.dumps(stamp, indent=2))
    return root


def median_call_seconds(fn: Callable[[], Any], seconds: float, device: Any = None) -> float:
    """Median wall seconds of ``fn()`` over about ``seconds`` (at least 3 calls) after one warm-up call
    (kernel selection); CUDA is synchronised around each call when ``device`` is a CUDA device."""
    fn()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        times.append(timed_call(fn, device))
    return statistics.median(times)


def timed_call(fn: Callable[[], Any], device: Any = None) -> float:
    """Wall seconds of one call of ``fn()``, CUDA synchronised before and after when ``device`` is CUDA."""
    from ctcovid.profiling import sync_device

    sync_device(device)
    t = time.perf_counter()
    fn()
    sync_device(device)
    return time.perf_counter() - t


def network_bench_args(doc: str, default_out: Path) -> Any:
    """Command line of the per-network benchmarks: ``--device``, ``--seconds`` per timing, ``--workdir``
    for the random-weight bundles (reused if present), ``--out``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--workdir", default=None, help="where the random-weight bundles go (reused if present)")
    ap.add_argument("--out", default=str(default_out))
    return ap.parse_args()


def write_bench_result(name: str, script: str, device: str, note: str, networks: dict, out: str | Path) -> None:
    """Write a per-network benchmark's results with the command, date and machine (atomically)."""
    import sys

    from ctcovid.io.atomic import write_json_atomic
    from ctcovid.profiling import describe_machine

    write_json_atomic(
        {
            "benchmark": name,
            "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": describe_machine(device),
            "note": note,
            "networks": networks,
        },
        Path(out),
    )
    print(f"wrote {out}")


def random_weight_pipeline(args: Any, names: Sequence[str] | None = None, **options: Any):
    """A ``CTCovidPipeline`` on :func:`random_weight_bundles` copies in ``args.workdir`` (reused there) or in
    a temporary folder removed once the networks are loaded, on ``args.device``, denormals flushed as
    ``ctcovid predict`` runs; ``options`` go to the pipeline."""
    import tempfile
    from contextlib import ExitStack

    from ctcovid.ct import CTCovidPipeline

    with ExitStack() as stack:
        work = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="ctcovid_bench_"))
        bundle_dir = random_weight_bundles(Path(work) / "bundles", names=names)
        return CTCovidPipeline(bundle_dir=bundle_dir, device=args.device, flush_denormal=True, **options)


def save_result(file_name: str, benchmark: str, **fields: Any) -> Path:
    """Write ``benchmarks/results/<file_name>`` (atomically): what was timed, the machine and its load, ``fields``."""
    import platform

    from ctcovid.io.atomic import write_json_atomic

    record = {
        "benchmark": benchmark,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_1min": os.getloadavg()[0]},
        **fields,
    }
    dest = write_json_atomic(record, Path(__file__).resolve().parent / "results" / file_name)
    print(f"wrote {dest}")
    return dest


def write_result_file(result: dict, out: str | Path, hide: Sequence[str] = ()) -> Path:
    """Write an evaluation's ``result`` to ``out`` (atomically) and print it without the bulky ``hide`` keys."""
    from ctcovid.io.atomic import write_json_atomic

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    dest = write_json_atomic(result, Path(out))
    print(json.dumps({k: v for k, v in result.items() if k not in hide}, indent=1))
    return dest
