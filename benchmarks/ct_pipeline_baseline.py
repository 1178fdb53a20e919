"""The CT pipeline run the way the paper's published code runs it: the benchmarks' slow baseline.

:func:`run_baseline` computes what :class:`ctcovid.ct.CTCovidPipeline` computes, with the same
network objects (so outputs are comparable and the speed ratio is fair), but organised as research
scripts usually are, one slice and one model call at a time:

- read: each DICOM file read on its own with ``pydicom.dcmread`` (pixels included), the series sorted by
  ImagePositionPatient along the slice normal; a NIfTI read with nibabel ``get_fdata()`` (float64) and
  cut slice by slice. Each slice is rescaled to HU and normalised to [0, 1] in NumPy float64 with each
  stage's ``NormalizeCTIntensity`` settings (``pipeline.normalization_args``: lung window for HU, volume
  percentiles for display values), giving the same numbers as :mod:`ctcovid.transforms.intensity`.
- slice filter, segmentation: every slice resized on its own with SciPy (float64, bilinear on pixel
  centres, the same sampling as the pipeline's ``F.interpolate(..., align_corners=False)``), then one
  model call per slice at batch 1 under ``torch.no_grad()``: ``torch.from_numpy(...).float().to(device)``
  in and ``.cpu().numpy()`` out on every call, softmax in NumPy float64. The segmenter's class
  probabilities are resized back per slice and arg-maxed (the pipeline thresholds P(lung) at 0.5: the
  same decision), then the bundle's label clean-up (``pipeline.stage("segmentation").cleanup``) runs on the 3D mask.
- slice selection: the pipeline's rule (slice-filter probability >= ``pipeline.slice_threshold``, or
  without slice-filter weights lung-mask area >= ``pipeline.min_lung_area`` of the slice).
- volume building: the kept slices lung-masked where the bundle's ``mask_lung`` says so, each resized on
  its own, and the stacks picked by NEAREST-neighbour depth resampling: output slice ``i`` of ``depth``
  is kept slice ``floor(i * (K - 1) / (depth - 1) + 0.5)``. The pipeline interpolates linearly between
  the same positions (``align_corners=True``), so the two agree exactly on the output slices whose
  position ``i * (K - 1) / (depth - 1)`` is a whole number (always the first and the last, all of them
  when ``K == depth``) and differ in between: the one intended difference in what the networks see.
  The detection (``depth`` 64) and severity (32 + 16) inputs are written to ``.npy`` files in
  ``workdir`` (float64, as prepared) and read back by the ensemble stages. Preparation comes before any
  prediction, so the severity input is built whenever severity may be graded (mode ``"covid"`` too).
- detection, severity: each ensemble member called on its own (fresh host-to-device copy each time),
  probabilities averaged in NumPy; severity graded on predicted COVID-19 only, on every scan with
  ``pipeline.severity_mode == "always"``, never with ``"never"``.
- Grad-CAM: per detection member, same target layer as ``DetectionStage.gradcam_layer``, maps averaged and
  resized to the scan's in-plane size in NumPy.
- write: the lung mask with ``nibabel.save`` and a JSON record with ``json.dump``, written in place (no
  temporary file and rename).

It is deliberately slow, to measure what the pipeline's batching, tensor resampling and in-memory
hand-over gain, and it is NOT part of the package: nothing in ``ctcovid`` imports it. It was written for
this project from the description of how the paper's code runs, not copied from it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BASELINE_STAGES",
    "DETECTION_INPUT_FILE",
    "SEVERITY_INPUT_FILE",
    "nearest_depth_indices",
    "run_baseline",
]

#: Stage names of ``timings_s``, in run order (stages whose network is unavailable are left out).
BASELINE_STAGES = (
    "read",
    "slice_filter",
    "segmentation",
    "volume_building",
    "detection",
    "gradcam",
    "severity",
    "write",
)

#: Prepared ensemble inputs, written to ``workdir`` and read back: ``(depth, H, W)`` and ``(a + b, H, W)``.
DETECTION_INPUT_FILE = "detection_input.npy"
SEVERITY_INPUT_FILE = "severity_input.npy"


# ---------------------------------------------------------------------------------------------- helpers
@contextmanager
def _timed(timings: dict[str, float], stage: str):
    t = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - t


def _resize(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``(h, w)`` -> ``(H, W)`` float64, bilinear on pixel centres with edge replication.

    The sampling of ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``, which the
    pipeline uses: SciPy's ``zoom`` with ``grid_mode=True`` maps pixel centres the same way.
    """
    from scipy import ndimage

    img = np.asarray(img, dtype=np.float64)
    h, w = (int(s) for s in size)
    if img.shape == (h, w):
        return img
    return ndimage.zoom(img, (h / img.shape[0], w / img.shape[1]), order=1, mode="nearest", grid_mode=True)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=0, keepdims=True))
    return z / z.sum(axis=0, keepdims=True)


def nearest_depth_indices(n_slices: int, depth: int) -> np.ndarray:
    """Kept-slice index of each of ``depth`` output slices: nearest neighbour, first and last kept.

    Output slice ``i`` samples position ``i * (n_slices - 1) / (depth - 1)`` (the positions the pipeline's
    linear ``align_corners=True`` resampling uses) and takes the nearest slice, halves rounded up.
    """
    if n_slices < 1 or depth < 1:
        raise ValueError(f"need n_slices >= 1 and depth >= 1, got {n_slices} and {depth}")
    if depth == 1:
        return np.zeros(1, dtype=np.int64)
    pos = np.arange(depth, dtype=np.float64) * (n_slices - 1) / (depth - 1)
    return np.minimum(np.floor(pos + 0.5).astype(np.int64), n_slices - 1)


# ------------------------------------------------------------------------------------------------ read
def _read_dicom_slices(folder: Path) -> tuple[list[np.ndarray], np.ndarray, bool]:
    """Every file read whole with pydicom, one series kept, sorted along the slice normal.

    Returns ``(slices, affine, has_rescale)``: float64 ``(X, Y)`` slices in rescaled units (X = column).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from ctcovid.io.slice_geometry import dicom_affine_ras

    datasets = []
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(f)
        except (InvalidDicomError, OSError):
            continue
        if "PixelData" in ds:
            datasets.append(ds)
    if not datasets:
        raise FileNotFoundError(f"{folder}: no DICOM images")
    series: dict[str, list] = {}
    for ds in datasets:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    datasets = max(series.values(), key=len)  # the series with the most slices

    iop = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient], dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda d: float(np.dot([float(v) for v in d.ImagePositionPatient], normal)))
    slices, has_rescale = [], True
    for ds in datasets:
        pixels = ds.pixel_array.astype(np.float64)
        has_rescale = has_rescale and "RescaleIntercept" in ds
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
        slices.append((pixels * slope + intercept).T)  # (rows, columns) -> (X = column, Y = row)
    first = np.asarray([float(v) for v in datasets[0].ImagePositionPatient])
    last = np.asarray([float(v) for v in datasets[-1].ImagePositionPatient])
    step = (last - first) / max(len(datasets) - 1, 1)
    spacing = [float(v) for v in datasets[0].get("PixelSpacing", (1.0, 1.0))]
    affine = dicom_affine_ras(first, iop, spacing, step)
    return slices, affine, has_rescale


def _read_nifti_slices(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    data = img.get_fdata()  # float64, stored order
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return [data[:, :, k] for k in range(data.shape[2])], np.asarray(img.affine, dtype=np.float64)


def _normalizer(args: dict, detected_domain: str, slices: list[np.ndarray]):
    """Per-slice float64 normalisation equal to ``NormalizeCTIntensity(**args)`` on the whole volume."""
    domain = args.get("domain") or detected_domain
    if domain == "hu":
        center, width = float(args.get("center", -600.0)), float(args.get("width", 1500.0))
        lower = center - width / 2
        return lambda s: np.clip((s - lower) / width, 0.0, 1.0)
    # display values: percentiles over the whole volume (non-zero voxels if ignore_zeros), then per slice
    values = np.concatenate([s.ravel() for s in slices])
    if args.get("ignore_zeros", True):
        nonzero = values[values != 0]
        values = nonzero if nonzero.size else values
    lo, hi = np.percentile(values, [float(args.get("lower", 0.5)), float(args.get("upper", 99.5))])
    if not hi > lo:
        return lambda s: np.zeros_like(s)
    return lambda s: np.clip((s - lo) / (hi - lo), 0.0, 1.0)


# ------------------------------------------------------------------------------------------- the stages
def _per_slice_probabilities(network, slices, size, device) -> list[np.ndarray]:
    """One model call per slice at batch 1 -> per slice ``(C, h, w)`` or ``(C,)`` float64 softmax."""
    out = []
    for s in slices:
        x = torch.from_numpy(_resize(s, size)[None, None]).float().to(device)
        with torch.no_grad():
            logits = network(x)
        out.append(_softmax(logits.cpu().numpy()[0]))
    return out


def _segment(pipeline, slices, device) -> np.ndarray:
    """``(X, Y, Z)`` uint8 lung mask: per-slice probabilities resized back and arg-maxed, then clean-up."""
    x_size = slices[0].shape
    mask = np.zeros((*x_size, len(slices)), dtype=np.uint8)
    size = pipeline.stage("segmentation").size
    for k, s in enumerate(slices):
        x = torch.from_numpy(_resize(s, size)[None, None]).float().to(device)
        with torch.no_grad():
            logits = pipeline.segmenter.network(x)
        prob = _softmax(logits.cpu().numpy()[0])  # (C, h, w)
        back = np.stack([_resize(p, x_size) for p in prob])  # each class resized back on its own
        mask[:, :, k] = (back.argmax(axis=0) > 0).astype(np.uint8)  # any lung label
    for transform in pipeline.stage("segmentation").cleanup:  # the segmenter bundle's own clean-up, as the pipeline applies it
        d = transform({key: torch.from_numpy(mask)[None] for key in transform.keys})
        mask = np.asarray(torch.as_tensor(d[transform.keys[0]])[0].cpu(), dtype=np.uint8)
    return mask


def _build_stacks(slices, mask, kept, depths, size, mask_lung) -> np.ndarray:
    """Kept slices (lung-masked if asked) resized one by one, then nearest-picked for each depth."""
    resized = []
    for k in kept:
        s = slices[k]
        if mask_lung:
            s = np.where(mask[:, :, k] > 0.5, s, 0.0)
        resized.append(_resize(s, size))
    stacks = [np.stack([resized[i] for i in nearest_depth_indices(len(kept), d)]) for d in depths]
    return np.concatenate(stacks, axis=0)  # (sum(depths), H, W) float64


def _ensemble_probabilities(network, x: np.ndarray, device) -> np.ndarray:
    """``(M, C)`` float64: each member called on its own with a fresh host-to-device copy."""
    out = []
    for member in network.members:
        t = torch.from_numpy(x[None]).float().to(device)
        with torch.no_grad():
            logits = member(t)
        out.append(_softmax(logits.cpu().numpy()[0]))
    return np.stack(out)


def run_baseline(
    scan: str | os.PathLike, pipeline, workdir: str | os.PathLike, gradcam: bool = True
) -> dict[str, Any]:
    """Run the paper-style CT pipeline on ``scan`` with ``pipeline``'s networks (see the module docstring).

    Args:
        scan: a DICOM series folder or a NIfTI file.
        pipeline: a loaded :class:`ctcovid.ct.CTCovidPipeline`; its networks, thresholds, bundle
            settings and device are used, its code is not.
        workdir: folder for the prepared ``.npy`` inputs and the outputs (``<id>_lung_mask.nii.gz``,
            ``<id>.json``); created.
        gradcam: compute the detection members' Grad-CAM (when the detector has weights).

    Returns:
        ``{"timings_s": {stage: seconds} (stages of :data:`BASELINE_STAGES` that ran), "kept_slices": [int],
        "lung_mask": (X, Y, Z) uint8, "covid_probability": float | None, "severity_probabilities":
        [float] per class | None}``, plus ``slice_probabilities`` ([float] per slice | None),
        ``covid_member_probabilities``, ``severity_member_probabilities`` ((M, C) lists | None),
        ``prediction``, ``heatmap`` ((X, Y) float64 | None) and ``outputs`` (paths written).

    Raises:
        ctcovid.io.errors.NoLungSlicesError: no slice is kept.
    """
    from ctcovid.ct.stages.detection import DEFAULT_DETECTION_CLASSES, covid_index
    from ctcovid.io.ct_volume import infer_intensity_domain
    from ctcovid.io.errors import NoLungSlicesError
    from ctcovid.running.scans import scan_name

    scan, work = Path(scan), Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    device = pipeline.device
    timings: dict[str, float] = {}
    stages = pipeline.models
    grade = pipeline.grader.available and pipeline.severity_mode != "never"

    # read: one file / one slice at a time, float64, normalised per slice with each stage's settings
    with _timed(timings, "read"):
        if scan.is_dir():
            raw, affine, has_rescale = _read_dicom_slices(scan)
            domain = "hu" if has_rescale else infer_intensity_domain(np.stack(raw, axis=-1))[0]
        else:
            raw, affine = _read_nifti_slices(scan)
            domain = infer_intensity_domain(np.stack(raw, axis=-1))[0]
        norm: dict[str, list[np.ndarray]] = {}
        by_args: dict[tuple, list[np.ndarray]] = {}
        for name, stage in stages.items():
            if not stage.available:
                continue
            args = pipeline.normalization_args.get(name) or {}
            key = tuple(sorted(args.items()))
            if key not in by_args:
                normalize = _normalizer(args, domain, raw)
                by_args[key] = [normalize(s) for s in raw]
            norm[name] = by_args[key]
    n_slices, x_size = len(raw), raw[0].shape

    slice_prob = None
    if pipeline.slice_filter.available:
        with _timed(timings, "slice_filter"):
            names = [n.lower() for n in pipeline.slice_filter.class_names(("non-lung", "lung"))]
            lung = names.index("lung") if "lung" in names else 1
            size = pipeline.slice_filter.in_plane_size((224, 224))
            probs = _per_slice_probabilities(
                pipeline.slice_filter.network, norm["slice_filter"], size, device
            )
            slice_prob = np.array([p[lung] for p in probs])

    with _timed(timings, "segmentation"):
        mask = _segment(pipeline, norm["segmentation"], device)

    # slice selection: the pipeline's rule (cheap, outside the timed stages as in the pipeline)
    if slice_prob is not None:
        kept = [k for k in range(n_slices) if slice_prob[k] >= pipeline.slice_threshold]
    else:
        area = mask.sum(axis=(0, 1))
        min_pixels = pipeline.min_lung_area * x_size[0] * x_size[1]
        kept = [k for k in range(n_slices) if area[k] >= min_pixels and area[k] > 0]
    if not kept:
        raise NoLungSlicesError(str(scan), f"no lung slices among {n_slices} (baseline)")

    # the ensembles' inputs, prepared up front and saved to .npy as the paper's scripts do
    det_file, sev_file = work / DETECTION_INPUT_FILE, work / SEVERITY_INPUT_FILE
    if pipeline.detector.available or grade:
        with _timed(timings, "volume_building"):
            if pipeline.detector.available:
                member = pipeline.detector.network.members[0]
                x = _build_stacks(
                    norm["detection"],
                    mask,
                    kept,
                    (int(getattr(member, "in_slices", 64)),),
                    pipeline.detector.in_plane_size((224, 224)),
                    bool(pipeline.detector.config_value("mask_lung", default=True)),
                )
                np.save(det_file, x)
            if grade:
                member = pipeline.grader.network.members[0]
                x = _build_stacks(
                    norm["severity"],
                    mask,
                    kept,
                    (int(getattr(member, "slices_a", 32)), int(getattr(member, "slices_b", 16))),
                    pipeline.grader.in_plane_size((299, 299)),
                    bool(pipeline.grader.config_value("mask_lung", default=True)),
                )
                np.save(sev_file, x)

    result: dict[str, Any] = {
        "scan_id": scan_name(scan),
        "kept_slices": kept,
        "lung_mask": mask,
        "slice_probabilities": None if slice_prob is None else [float(p) for p in slice_prob],
        "covid_probability": None,
        "covid_member_probabilities": None,
        "prediction": None,
        "heatmap": None,
        "severity_probabilities": None,
        "severity_member_probabilities": None,
    }
    covid_class = 1
    if pipeline.detector.available:
        with _timed(timings, "detection"):
            x = np.load(det_file)
            members = _ensemble_probabilities(pipeline.detector.network, x, device)
            covid_class = covid_index(pipeline.detector.class_names(DEFAULT_DETECTION_CLASSES))
            p_covid = float(members[:, covid_class].mean())
            result["covid_member_probabilities"] = members.tolist()
            result["covid_probability"] = p_covid
            result["prediction"] = "COVID-19" if p_covid >= pipeline.covid_threshold else "non-COVID-19"
        if gradcam:
            from ctcovid.visualize.gradcam import gradcam_heatmap

            with _timed(timings, "gradcam"):
                x = np.load(det_file)
                maps = []
                for member in pipeline.detector.network.members:
                    t = torch.from_numpy(x[None]).float().to(device)
                    layer = pipeline.stage("detection").gradcam_layer(pipeline, member)
                    maps.append(gradcam_heatmap(member, t, layer, class_index=covid_class).astype(np.float64))
                result["heatmap"] = np.clip(_resize(np.mean(maps, axis=0), x_size), 0.0, 1.0)

    if grade and (pipeline.severity_mode == "always" or result["prediction"] == "COVID-19"):
        with _timed(timings, "severity"):
            x = np.load(sev_file)
            members = _ensemble_probabilities(pipeline.grader.network, x, device)
            result["severity_member_probabilities"] = members.tolist()
            result["severity_probabilities"] = [float(p) for p in members.mean(axis=0)]

    with _timed(timings, "write"):
        import nibabel as nib

        mask_path = work / f"{result['scan_id']}_lung_mask.nii.gz"
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(mask_path))
        record = {
            k: v
            for k, v in result.items()
            if k not in ("lung_mask", "heatmap") and not isinstance(v, np.ndarray)
        }
        record["timings_s"] = dict(timings)
        json_path = work / f"{result['scan_id']}.json"
        with open(json_path, "w") as f:
            json.dump(record, f, indent=2)
    result["outputs"] = {"lung_mask": str(mask_path), "record": str(json_path)}
    result["timings_s"] = timings
    return result
