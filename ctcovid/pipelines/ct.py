"""The end-to-end CT pipeline: scan on disk -> lung mask, COVID-19 probability, severity grade.

Stages, in one process and without intermediate files (CNR-IEMN COV19D approach)::

    read (ctcovid.io.load_ct) -> normalise intensity to [0, 1] by domain (HU lung window / display percentiles)
    slice filter   ResNeXt-50 per slice -> kept lung slices        (bundle ct_lung_slice_filter)
                   or, without its weights, lung-mask area per slice (LungSlicesFromMask)
    segmentation   Attention U-Net per slice, batched -> lung mask  (bundle ct_lung_segmentation)
    detection      kept slices resampled to 64x224x224 (lung-masked if the bundle's ``mask_lung`` says so)
                   -> ensemble P(COVID-19) + member spread, and the Grad-CAM of every member averaged
                                                                     (bundle ct_covid_classification)
    severity       kept slices, lung-masked, 32+16 x 299x299 -> ensemble P(mild..critical)
                   on scans predicted COVID-19, or on all with severity="always"
                                                                     (bundle ct_covid_severity_classification)

Each network comes from its bundle (``network_def`` of ``configs/inference.json`` + ``models/model.pt``,
see :mod:`ctcovid.pipelines.bundles`). What the bundle defines, the pipeline reads from it rather than
from constants here: input sizes (``spatial_size``, metadata ``spatial_shape``, stack depths from the
instantiated networks), class names, ``mask_lung``, the slice-filter ``threshold``, ``lung_min_area``,
``NormalizeCTIntensityd`` arguments and the segmenter's label clean-up (``KeepLargestConnectedComponentd``). Use :class:`CTCovidPipeline` from Python and
:func:`ctcovid.pipelines.batch.run_batch` (``ctcovid predict``) for folders of scans with outputs on disk.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctcovid.io.errors import CTInputError, NoLungSlicesError
from ctcovid.networks import batchnorm_folding

from .bundles import StageModel, load_stage
from .memory import release_free_memory

__all__ = [
    "CTCovidPipeline",
    "CTResult",
    "DEFAULT_BUNDLES",
    "PRECISIONS",
    "SEVERITY_MODES",
    "STAGES",
    "resolve_device",
]

#: Bundle of each network stage.
DEFAULT_BUNDLES = {
    "slice_filter": "ct_lung_slice_filter",
    "segmentation": "ct_lung_segmentation",
    "detection": "ct_covid_classification",
    "severity": "ct_covid_severity_classification",
}

#: Stages in run order (``read`` includes intensity normalisation; ``volume_building`` makes the detection
#: and severity stacks from the kept slices; ``gradcam`` explains ``detection``).
STAGES = (
    "read",
    "slice_filter",
    "segmentation",
    "mask_cleanup",
    "volume_building",
    "detection",
    "gradcam",
    "severity",
)

#: Arithmetic of the network forward passes: ``"fp32"``, or ``"bf16"`` autocast (CPU with AVX-512 BF16 /
#: AMX, CUDA from Ampere on): the networks ran 1.3-2.2x faster on a 2-core AVX-512 BF16 CPU, whole scans
#: 1.1-2.1x; see the README performance section for how much the outputs move.
PRECISIONS = ("fp32", "bf16")

#: Slices per forward pass when ``batch_size`` is not given, by device type and precision: measured
#: fastest per slice (benchmarks/results/ct_pipeline.json, two sweeps on a 2-core CPU: in fp32 ResNeXt-50
#: and the Attention U-Net run best at 2-8 and up to 2.5x slower per slice at 32; in bf16 at 8, ~15 %
#: faster than at 4). GPUs need large batches to fill.
DEFAULT_BATCH_SIZE = {"cpu": {"fp32": 4, "bf16": 8}, "cuda": {"fp32": 32, "bf16": 32}}

#: Stages whose networks get their batch norms folded (``fold_batchnorm``): they run once per slice, so
#: what they gain (15-26 % per call) counts most in a scan.
_FOLD_STAGES = ("slice_filter", "segmentation")

#: ``"covid"``: grade severity only on scans predicted COVID-19; ``"always"``: on every scan; ``"never"``.
SEVERITY_MODES = ("covid", "always", "never")

#: Detection/severity class names used when a bundle's metadata gives no ``channel_def``.
_DEFAULT_DETECTION_CLASSES = ("non-COVID-19", "COVID-19")
_DEFAULT_SEVERITY_CLASSES = ("mild", "moderate", "severe", "critical")


#: Label-map clean-up transforms of the segmenter bundle's postprocessing that the pipeline applies too.
_MASK_POSTPROCESSING = ("KeepLargestConnectedComponentd", "RemoveSmallObjectsd", "FillHolesd", "LabelFilterd")

#: Arguments of ``NormalizeCTIntensity(d)`` taken over from a bundle's preprocessing.
_NORM_ARGS = ("domain", "center", "width", "lower", "upper", "ignore_zeros")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` as given.

    Raises ``ValueError`` for an unknown name or CUDA requested on a machine without it.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use --device cpu or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r} (use cpu, cuda, cuda:N or auto)")
    return dev


def _covid_index(names: Sequence[str]) -> int:
    """Index of the COVID-19 class among ``names`` (class 1 if the names do not say)."""
    for i, n in enumerate(names):
        key = "".join(ch for ch in n.lower() if ch.isalnum())
        if key in ("covid", "covid19", "positive"):
            return i
    return 1


@dataclass
class CTResult:
    """Everything the pipeline found for one scan.

    Scalars and lists go into :meth:`to_dict` (the ``<scan>.json`` record). The arrays (``lung_mask``,
    ``image``, ``heatmap``, ``affine``) are for writing the mask and montage (:meth:`save`) and for
    notebooks; they are not in the record.

    Attributes (shapes refer to the input scan ``(X, Y, Z)``, Z = slices):
        status: ``"ok"`` or ``"failed"`` (``reason`` then says why).
        kept_slices: indices (along Z) of the slices judged to contain lung, ascending.
        slice_selection: ``"slice_filter"`` (ResNeXt) or ``"lung_mask_area"`` (fallback without its weights).
        lung_volume_ml: lung mask voxel count x voxel volume / 1000 (``None`` when spacing is unknown,
            e.g. slice-image folders, where ``lung_voxels`` still counts the mask).
        covid_probability / covid_probability_spread: mean and population standard deviation over the
            detection members of P(COVID-19); ``None`` when detection was skipped.
        severity_probabilities / severity_spread: per class, same convention; ``None`` when not graded.
        stages: per stage ``"ok"``, ``"skipped: <why>"`` or ``"not run: <why>"``.
        models: per stage ``{bundle, version, weights_sha256, status}``.
        timings_s: seconds per stage.
    """

    scan_id: str
    path: str
    status: str = "ok"
    reason: str | None = None
    source_format: str | None = None
    series_uid: str | None = None
    input_sha256: str | None = None
    shape: list[int] | None = None
    spacing_mm: list[float] | None = None
    spacing_known: bool | None = None
    intensity_domain: str | None = None
    slices_read: int | None = None
    kept_slices: list[int] = field(default_factory=list)
    slice_selection: str | None = None
    lung_voxels: int | None = None
    lung_volume_ml: float | None = None
    covid_probability: float | None = None
    covid_probability_spread: float | None = None
    covid_member_probabilities: list[float] | None = None
    covid_threshold: float | None = None
    prediction: str | None = None
    severity_probabilities: dict[str, float] | None = None
    severity_spread: dict[str, float] | None = None
    severity: str | None = None
    gradcam_layer: str | None = None
    stages: dict[str, str] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    resume_key: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    lung_mask: np.ndarray | None = field(default=None, repr=False)  # (X, Y, Z) uint8
    image: np.ndarray | None = field(default=None, repr=False)  # (X, Y, Z) float32 in [0, 1]
    heatmap: np.ndarray | None = field(default=None, repr=False)  # (X, Y) float32 in [0, 1]
    affine: np.ndarray | None = field(default=None, repr=False)  # (4, 4) index -> RAS mm

    @property
    def slices_kept(self) -> int:
        return len(self.kept_slices)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (what ``<scan>.json`` holds)."""
        from ctcovid import __version__

        detection = None
        if self.covid_probability is not None:
            detection = {
                "covid_probability": self.covid_probability,
                "covid_probability_spread": self.covid_probability_spread,
                "member_probabilities": self.covid_member_probabilities,
                "threshold": self.covid_threshold,
                "prediction": self.prediction,
                "gradcam_layer": self.gradcam_layer,
            }
        severity = None
        if self.severity_probabilities is not None:
            severity = {
                "grade": self.severity,
                "probabilities": self.severity_probabilities,
                "spread": self.severity_spread,
            }
        return {
            "scan": {
                "id": self.scan_id,
                "path": self.path,
                "format": self.source_format,
                "series_uid": self.series_uid or None,
                "input_sha256": self.input_sha256,
                "shape": self.shape,
                "spacing_mm": self.spacing_mm,
                "spacing_known": self.spacing_known,
                "intensity_domain": self.intensity_domain,
            },
            "status": self.status,
            "reason": self.reason,
            "slices": {
                "read": self.slices_read,
                "kept": self.slices_kept,
                "kept_indices": list(self.kept_slices),
                "selection": self.slice_selection,
            },
            "lung_voxels": self.lung_voxels,
            "lung_volume_ml": self.lung_volume_ml,
            "detection": detection,
            "severity": severity,
            "stages": dict(self.stages),
            "models": dict(self.models),
            "timings_s": {k: round(v, 4) for k, v in self.timings_s.items()},
            "outputs": dict(self.outputs),
            "resume_key": self.resume_key,
            "ctcovid_version": __version__,
        }

    def save(self, out_dir: str | os.PathLike, montage: bool = True) -> dict[str, Path]:
        """Write ``<id>_lung_mask.nii.gz``, ``<id>_montage.png`` and then ``<id>.json`` into ``out_dir``.

        Each file is written atomically; the JSON goes last, so its presence means the others are complete
        (the resume check relies on that). A failed result writes only its JSON record.
        """
        from .montage import pick_montage_slices, save_montage_png
        from .outputs import write_json_atomic, write_nifti_atomic

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        if self.status == "ok" and self.lung_mask is not None and self.affine is not None:
            written["lung_mask"] = write_nifti_atomic(
                self.lung_mask.astype(np.uint8), self.affine, out / f"{self.scan_id}_lung_mask.nii.gz"
            )
        if self.status == "ok" and montage and self.image is not None and self.lung_mask is not None:
            t = time.perf_counter()
            title, note = self._montage_heading()
            written["montage"] = save_montage_png(
                out / f"{self.scan_id}_montage.png",
                self.image,
                self.lung_mask,
                pick_montage_slices(self.kept_slices),
                affine=self.affine,
                heatmap=self.heatmap,
                title=title,
                note=note,
            )
            self.timings_s["montage"] = time.perf_counter() - t  # the costliest output (~1 s of matplotlib)
        self.outputs = {k: p.name for k, p in written.items()}
        self.outputs["record"] = f"{self.scan_id}.json"
        written["record"] = write_json_atomic(self.to_dict(), out / f"{self.scan_id}.json")
        return written

    def _montage_heading(self) -> tuple[str, str]:
        parts = [self.scan_id, f"{self.slices_kept}/{self.slices_read} slices kept ({self.slice_selection})"]
        if self.lung_volume_ml is not None:
            parts.append(f"lung {self.lung_volume_ml:.0f} ml")
        if self.covid_probability is not None:
            parts.append(
                f"P(COVID-19) {self.covid_probability:.3f} ± {self.covid_probability_spread:.3f} -> {self.prediction}"
            )
        if self.severity is not None:
            parts.append(f"severity {self.severity}")
        notes = ["green: lung contour"]
        if self.heatmap is not None:
            notes.append("colour: Grad-CAM of the detection ensemble (mean over members, one map per scan)")
        elif self.stages.get("detection", "").startswith("skipped"):
            bundle = self.models.get("detection", {}).get("bundle", "detection bundle")
            notes.append(
                f"detection skipped ({bundle} has no trained weights): lung contour only, no Grad-CAM"
            )
        else:
            notes.append(f"no Grad-CAM ({self.stages.get('gradcam', 'not run')})")
        return " | ".join(parts), "; ".join(notes)

    def summary_row(self) -> dict[str, Any]:
        """One ``summary.csv`` row (key numbers; probabilities rounded to 4 decimals)."""

        def r(v: float | None) -> float | None:
            return None if v is None else round(float(v), 4)

        row: dict[str, Any] = {
            "scan_id": self.scan_id,
            "path": self.path,
            "status": self.status,
            "reason": self.reason,
            "slices_read": self.slices_read,
            "slices_kept": self.slices_kept if self.status == "ok" else None,
            "lung_volume_ml": r(self.lung_volume_ml),
            "covid_probability": r(self.covid_probability),
            "covid_probability_spread": r(self.covid_probability_spread),
            "prediction": self.prediction,
            "severity": self.severity,
        }
        for name, p in (self.severity_probabilities or {}).items():
            row[f"p_{name}"] = r(p)
        return row


@contextmanager
def _timed(res: CTResult, stage: str):
    """Add the seconds a stage takes to ``res.timings_s`` and mark it ``ok`` when it finishes; the heap
    pages the stage freed go back to the system (:func:`release_free_memory`, timed with the stage)."""
    t = time.perf_counter()
    yield
    release_free_memory()
    res.timings_s[stage] = res.timings_s.get(stage, 0.0) + time.perf_counter() - t
    if stage != "normalize":
        res.stages[stage] = "ok"


def _bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every non-zero voxel, grown by ``margin`` within the array;
    ``None`` for an empty mask."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(max(0, hits[0] - margin), min(mask.shape[axis], hits[-1] + 1 + margin)))
    return tuple(box)


def _binary_keep_largest_args(transform, mask: np.ndarray) -> tuple[int, int] | None:
    """``(num_components, connectivity)`` when ``transform`` is MONAI's ``KeepLargestConnectedComponentd``
    applied to label 1 of a 0/1 mask (the segmenter bundle's clean-up), else ``None``."""
    from monai.transforms import KeepLargestConnectedComponentd

    if not isinstance(transform, KeepLargestConnectedComponentd):
        return None
    t = transform.converter
    if (
        t.is_onehot
        or (t.applied_labels is not None and tuple(t.applied_labels) != (1,))
        or mask.max(initial=0) > 1
    ):
        return None
    return int(t.num_components), int(t.connectivity or mask.ndim)


def _keep_largest_components(mask: np.ndarray, num_components: int, connectivity: int) -> np.ndarray:
    """The ``num_components`` largest connected components of a 0/1 mask, as MONAI's
    ``KeepLargestConnectedComponent`` computes them (same labelling, ranking and connectivity), with
    16-bit labels when they suffice (else 32-bit): on a 300x512x512 mask about 3x faster and with a sixth
    to a third of the memory of MONAI's 64-bit labelling (issue 9)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    try:
        labels, count = ndimage.label(mask, structure=structure, output=np.uint16)
    except RuntimeError as e:  # more than 65535 provisional labels: scipy says so before writing any
        if "bit-depth" not in str(e):
            raise
        labels, count = ndimage.label(mask, structure=structure, output=np.int32)
    if count <= num_components:
        return mask
    # bincount and fancy indexing copy their 16/32-bit labels to int64: done in slabs, so the copies stay small
    slabs = [slice(i, i + 32) for i in range(0, labels.shape[0], 32)]
    sizes = np.zeros(count + 1, dtype=np.int64)
    for slab in slabs:
        sizes += np.bincount(labels[slab].ravel(), minlength=count + 1)
    sizes[0] = 0  # background
    keep = np.zeros(count + 1, dtype=np.uint8)
    keep[np.argsort(sizes)[::-1][:num_components]] = 1
    out = np.empty(labels.shape, dtype=np.uint8)
    for slab in slabs:
        out[slab] = keep[labels[slab]]
    return out


def _take_slices(volume: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """``(C, X, Y, Z)`` -> ``(C, X, Y, K)`` slices ``kept``: a view (no copy of a 300-slice volume) when
    they are one consecutive run, as kept lung slices usually are; else a gathered copy."""
    if len(kept) and list(kept) == list(range(kept[0], kept[0] + len(kept))):
        return volume[..., kept[0] : kept[0] + len(kept)]
    return volume.index_select(volume.ndim - 1, torch.as_tensor(list(kept), dtype=torch.long))


class _NormalizedViews:
    """The volume normalised to [0, 1] with each stage's own ``NormalizeCTIntensity`` settings, computed
    once per distinct setting (usually all stages share one)."""

    def __init__(self, volume, args_by_stage: dict[str, dict]) -> None:
        self.volume = volume
        self.args_by_stage = args_by_stage
        self.cache: dict[tuple, torch.Tensor] = {}

    def get(self, stage: StageModel) -> torch.Tensor:
        from ctcovid.transforms import NormalizeCTIntensity

        args = self.args_by_stage.get(stage.stage) or {}
        key = tuple(sorted(args.items()))
        if key not in self.cache:
            if self.volume is None:
                raise RuntimeError(f"{stage.stage}: its normalised view was not made before the scan was released")
            out = NormalizeCTIntensity(**args)(self.volume)
            out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
            self.cache[key] = out.float().contiguous()
        return self.cache[key]

    def release_source(self, stages: Sequence[StageModel]) -> None:
        """Make the views of ``stages`` now and drop the reference to the scan's own intensities, which
        nothing after normalisation reads: when the caller handed the volume over (``__call__``, the batch
        runner) it is freed here instead of staying beside its normalised copy (315 MB for 300 slices)."""
        for stage in stages:
            self.get(stage)
        self.volume = None


class CTCovidPipeline:
    """COVID-19 detection and severity grading for one CT scan at a time (networks loaded once).

    Args:
        bundle_dir: folder holding the bundles (default :func:`ctcovid.bundle.bundles_root`).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_size: slices per forward pass in the slice-level stages (slice filter, segmentation);
            default :data:`DEFAULT_BATCH_SIZE` of the device type and precision.
        precision: one of :data:`PRECISIONS`; ``"bf16"`` runs the network forward passes under
            ``torch.autocast`` in bfloat16. Inputs, outputs, the mask decision and Grad-CAM stay float32.
        channels_last: run the networks (and their inputs) in channels-last memory format. ``None``: each
            bundle's ``channels_last`` config value decides (set where it measured faster:
            ``benchmarks/results/ct_memory_format.json``). Results are the same up to float rounding.
        fold_batchnorm: fold the batch norms of the slice-level networks (slice filter, segmenter) into
            their convolutions once the weights are loaded (:func:`ctcovid.networks.fold_batchnorm`): the
            same function up to float rounding, 15-26 % faster per call on a 2-core CPU
            (``benchmarks/results/ct_batchnorm_folding.json``); :attr:`folded_batchnorms` counts
            them per stage. The ensembles are left as built (Grad-CAM reads the detection members' layers,
            and their timm norm+activation layers do not fold this way).
        flush_denormal: on CPU, flush denormal floats to zero (``torch.set_flush_denormal``). Off by
            default because it is process-wide processor state that other code can notice (numpy and
            hypothesis see subnormals vanish); ``ctcovid predict``/``demo``, which own their process, turn
            it on:
            deep layers can produce values below 1e-38 whose arithmetic is 10-20x slower on x86 (the
            randomly initialised Inception ensemble once measured 6.5 s instead of 0.8 s here); zeroing
            them changes nothing visible. It sets the calling thread's FTZ/DAZ flags, which the intra-op
            worker threads inherit when they start after it (set before the first parallel op).
        severity: one of :data:`SEVERITY_MODES`.
        skip_missing: stages whose bundle has no ``models/model.pt`` are skipped (reported in every
            result) instead of raising :class:`~ctcovid.pipelines.bundles.MissingWeightsError`. The
            slice filter is optional anyway (lung-mask area decides without it); the lung segmenter is
            always required.
        allow_2d: accept single-slice inputs (one DICOM file, one image) as 1-slice scans.
        covid_threshold: P(COVID-19) at or above which a scan is predicted COVID-19.
        gradcam: compute the Grad-CAM heat map of the detection ensemble.
        slice_threshold: lung probability at or above which the slice filter keeps a slice; default: the
            slice-filter bundle's ``threshold``, else 0.5.
        min_lung_area: without slice-filter weights, a slice is lung when its mask covers at least this
            fraction of the slice (:class:`ctcovid.transforms.LungSlicesFromMask`); default: the
            detection bundle's ``lung_min_area`` (the rule its training data went through), else 0.01.
        bundles: override the bundle name of a stage, e.g. ``{"detection": "my_detector"}``.

    Calling the pipeline on a path returns a :class:`CTResult` and raises a
    :class:`~ctcovid.io.errors.CTInputError` subclass for unusable input (no lung slices included).
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
        severity: str = "covid",
        skip_missing: bool = False,
        allow_2d: bool = False,
        covid_threshold: float = 0.5,
        gradcam: bool = True,
        slice_threshold: float | None = None,
        min_lung_area: float | None = None,
        bundles: dict[str, str] | None = None,
        precision: str = "fp32",
        channels_last: bool | None = None,
        flush_denormal: bool = False,
        fold_batchnorm: bool = True,
    ) -> None:
        if severity not in SEVERITY_MODES:
            raise ValueError(f"severity must be one of {SEVERITY_MODES}, got {severity!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = resolve_device(device)
        if precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"precision 'bf16' is not supported on {torch.cuda.get_device_name(self.device)}"
            )
        self.precision = precision
        self.batch_size = int(batch_size or DEFAULT_BATCH_SIZE.get(self.device.type, {}).get(precision, 4))
        if flush_denormal and self.device.type == "cpu":
            torch.set_flush_denormal(True)
        self.severity_mode = severity
        self.allow_2d = bool(allow_2d)
        self.covid_threshold = float(covid_threshold)
        self.use_gradcam = bool(gradcam)
        names = {**DEFAULT_BUNDLES, **(bundles or {})}
        self.bundle_dir = bundle_dir
        # the slice filter is optional by design (issue 5): without weights the mask area decides
        self.slice_filter = load_stage(
            "slice_filter", names["slice_filter"], bundle_dir, self.device, skip_missing=True
        )
        self.segmenter = load_stage(
            "segmentation", names["segmentation"], bundle_dir, self.device, skip_missing=False
        )
        self.detector = load_stage("detection", names["detection"], bundle_dir, self.device, skip_missing)
        self.grader = load_stage("severity", names["severity"], bundle_dir, self.device, skip_missing)
        self.folded_batchnorms = {
            stage: batchnorm_folding.fold_batchnorm(self.stage_models[stage].network) if fold_batchnorm else 0
            for stage in _FOLD_STAGES
            if self.stage_models[stage].available
        }
        self.channels_last = {
            stage: bool(
                m.config_value("channels_last", default=False) if channels_last is None else channels_last
            )
            for stage, m in self.stage_models.items()
            if m.available
        }
        for stage, use in self.channels_last.items():
            if use:
                self.stage_models[stage].network.to(memory_format=torch.channels_last)
        self._seg_size = self._segmentation_size()
        self._mask_post = self._mask_postprocessing()
        # each stage normalises intensities as its bundle's preprocessing does (NormalizeCTIntensityd args)
        self._norm_args = {
            stage: m.transform_args("NormalizeCTIntensityd", _NORM_ARGS) or {}
            for stage, m in self.stage_models.items()
            if m.available
        }
        if slice_threshold is None:
            slice_threshold = self.slice_filter.config_value("threshold", default=0.5)
        self.slice_threshold = float(slice_threshold)
        if min_lung_area is None:
            min_lung_area = self.detector.config_value("lung_min_area", default=0.01)
        self.min_lung_area = float(min_lung_area)

    # ------------------------------------------------------------------ provenance
    @property
    def stage_models(self) -> dict[str, StageModel]:
        return {
            "slice_filter": self.slice_filter,
            "segmentation": self.segmenter,
            "detection": self.detector,
            "severity": self.grader,
        }

    def model_versions(self) -> dict[str, dict]:
        """Per stage ``{bundle, version, weights_sha256, status}`` (part of every result and resume key)."""
        return {stage: m.provenance() for stage, m in self.stage_models.items()}

    def options(self) -> dict[str, Any]:
        """Options that change results (part of the resume key)."""
        return {
            "severity": self.severity_mode,
            "allow_2d": self.allow_2d,
            "covid_threshold": self.covid_threshold,
            "gradcam": self.use_gradcam,
            "slice_threshold": self.slice_threshold,
            "min_lung_area": self.min_lung_area,
            "precision": self.precision,
        }

    def skipped_stages(self) -> dict[str, str]:
        """``{stage: why}`` for network stages that will not run for lack of weights."""
        return {stage: m.skipped for stage, m in self.stage_models.items() if not m.available}

    # ------------------------------------------------------------------ running
    def read(self, path: str | os.PathLike):
        """Read a scan with :func:`ctcovid.io.load_ct` -> ``MetaTensor`` (1, X, Y, Z)."""
        from ctcovid.io import load_ct

        volume = load_ct(path, allow_2d=self.allow_2d)
        return getattr(volume, "image", volume)  # a CTVolume wrapper or the MetaTensor itself

    def __call__(self, path: str | os.PathLike, scan_id: str | None = None) -> CTResult:
        """Run every stage on the scan at ``path``; raises ``CTInputError`` for unusable input."""
        t0 = time.perf_counter()
        # the volume goes straight into process() (no name holds it here), so it can be freed there once
        # normalised; arguments are evaluated in order, so read_seconds is taken after the read
        return self.process(self.read(path), path=path, scan_id=scan_id, read_seconds=time.perf_counter() - t0)

    def process(
        self,
        volume,
        path: str | os.PathLike | None = None,
        scan_id: str | None = None,
        read_seconds: float | None = None,
        on_stage: Callable[[str], None] | None = None,
    ) -> CTResult:
        """Run the network stages on a volume from :meth:`read`.

        Args:
            volume: ``MetaTensor`` (1, X, Y, Z) with the :mod:`ctcovid.io` metadata.
            path: the input path to record (default: the volume's ``filename_or_obj``).
            scan_id: id for outputs (default: derived from the path).
            read_seconds: reading time to record under ``timings_s["read"]``.
            on_stage: called with each stage name as it starts (progress bars).

        Raises:
            NoLungSlicesError: neither the slice filter nor the lung mask finds a lung slice.
        """
        meta = getattr(volume, "meta", {})
        src = os.fspath(path) if path is not None else str(meta.get("filename_or_obj", ""))
        if volume.ndim != 4 or volume.shape[0] != 1:
            raise CTInputError(
                src, f"expected a (1, X, Y, Z) volume from the reader, got {tuple(volume.shape)}"
            )
        if scan_id is None:
            from .scans import _scan_name

            scan_id = _scan_name(Path(src)) if src else "scan"
        notify = on_stage or (lambda _s: None)
        res = CTResult(
            scan_id=scan_id, path=src, models=self.model_versions(), covid_threshold=self.covid_threshold
        )
        if read_seconds is not None:
            res.timings_s["read"] = read_seconds
        res.stages["read"] = "ok"
        self._describe(res, volume, meta)
        norm = _NormalizedViews(volume, self._norm_args)
        del volume  # from here on only `norm` holds the scan's own intensities, until it releases them

        notify("normalize")
        with _timed(res, "normalize"):
            image = norm.get(self.segmenter)  # (1, X, Y, Z) in [0, 1]
            norm.release_source([m for m in self.stage_models.values() if m.available])
        res.image = image[0].numpy()

        # 1) slice filter network, before segmentation as in the paper (optional: else the mask area decides)
        slice_prob = None
        if self.slice_filter.available:
            notify("slice_filter")
            with _timed(res, "slice_filter"):
                slice_prob = self._slice_filter_probabilities(norm.get(self.slice_filter))
            res.slice_selection = "slice_filter"
        else:
            res.stages["slice_filter"] = f"skipped: {self.slice_filter.skipped}; lung-mask area decides"
            res.slice_selection = "lung_mask_area"

        # 2) lung segmentation of every slice: the mask is an output in the input's geometry
        notify("segmentation")
        with _timed(res, "segmentation"):
            mask = self._segment(image, clean=False)  # (X, Y, Z) uint8
        notify("mask_cleanup")
        with _timed(res, "mask_cleanup"):  # 3D connected components: timed apart from the network stage
            res.lung_mask = self._clean_mask(mask)
        res.lung_voxels = int(res.lung_mask.sum())
        if res.spacing_known:
            res.lung_volume_ml = res.lung_voxels * float(np.prod(res.spacing_mm)) / 1000.0
        res.kept_slices = self._select_slices(res, image, slice_prob, src)
        kept_mask = _take_slices(torch.from_numpy(res.lung_mask)[None], res.kept_slices)  # (1, X, Y, K) uint8

        # 3) detection ensemble + Grad-CAM
        if self.detector.available:
            notify("volume_building")
            with _timed(res, "volume_building"):
                x = self._detection_input(_take_slices(norm.get(self.detector), res.kept_slices), kept_mask)
            notify("detection")
            with _timed(res, "detection"):
                class_index = self._detect(res, x)
            if self.use_gradcam:
                notify("gradcam")
                with _timed(res, "gradcam"):
                    res.heatmap, res.gradcam_layer = self._gradcam(x, class_index, res.shape[:2])
            else:
                res.stages["gradcam"] = "not run: disabled"
        else:
            res.stages["detection"] = f"skipped: {self.detector.skipped}"
            res.stages["gradcam"] = "not run: detection skipped"

        # 4) severity ensemble (on predicted COVID-19 unless severity="always")
        run_severity, why_not = self._should_grade(res)
        if run_severity:
            notify("volume_building")
            with _timed(res, "volume_building"):
                x = self._severity_input(_take_slices(norm.get(self.grader), res.kept_slices), kept_mask)
            notify("severity")
            with _timed(res, "severity"):
                self._grade(res, x)
        else:
            res.stages["severity"] = why_not
        return res

    # ------------------------------------------------------------------ stage internals
    def _should_grade(self, res: CTResult) -> tuple[bool, str]:
        if not self.grader.available:
            return False, f"skipped: {self.grader.skipped}"
        if self.severity_mode == "never":
            return False, "not run: severity='never'"
        if self.severity_mode == "always":
            return True, ""
        if res.covid_probability is None:
            return False, "not run: no detection result to decide on (use severity='always')"
        if res.prediction != "COVID-19":
            return (
                False,
                f"not run: predicted non-COVID-19 (P={res.covid_probability:.3f} < {self.covid_threshold})",
            )
        return True, ""

    @staticmethod
    def _describe(res: CTResult, volume, meta: dict) -> None:
        """Scan identity and geometry from the reader's metadata."""
        res.source_format = meta.get("source_format")
        res.series_uid = meta.get("series_instance_uid") or None
        res.shape = [int(s) for s in volume.shape[1:]]
        res.spacing_mm = [float(s) for s in meta.get("spacing", (1.0, 1.0, 1.0))]
        res.spacing_known = bool(meta.get("spacing_known", True))
        res.intensity_domain = meta.get("intensity_domain")
        res.slices_read = int(volume.shape[-1])
        res.affine = np.asarray(meta.get("original_affine", meta.get("affine", np.eye(4))), dtype=np.float64)

    def _select_slices(self, res: CTResult, image: torch.Tensor, slice_prob, src: str) -> list[int]:
        """Kept slice indices: slice-filter probabilities >= threshold, else lung-mask area >= min_lung_area."""
        from monai.data import MetaTensor

        from ctcovid.transforms import LungSlicesFromMask, SelectLungSlices, kept_slices_from_meta

        mask = res.lung_mask
        if slice_prob is None:
            slice_prob = LungSlicesFromMask(min_area=self.min_lung_area)(torch.from_numpy(mask)[None])
            threshold = 0.5  # the indicator is 0 / 1
        else:
            threshold = self.slice_threshold
        try:
            kept = SelectLungSlices(threshold)(MetaTensor(image, meta={"filename_or_obj": src}), slice_prob)
        except NoLungSlicesError:
            if res.slice_selection == "slice_filter":
                raise
            largest = int(mask.sum(axis=(0, 1)).max()) if mask.size else 0
            raise NoLungSlicesError(
                src,
                f"no lung slices: the lung mask covers >= {100 * self.min_lung_area:g}% of the slice on none of "
                f"{res.slices_read} slices (largest lung area {largest} of {mask.shape[0] * mask.shape[1]} pixels)",
            ) from None
        return kept_slices_from_meta(kept.meta)

    def _detect(self, res: CTResult, x: torch.Tensor) -> int:
        """Fill the detection fields from the ``(1, S, H, W)`` stack; returns the COVID-19 class index."""
        with torch.inference_mode(), self._autocast():
            # one pass per member; mean and population std over members as
            # ProbabilityEnsemble.predict_with_spread defines them, plus each member's own value
            members = self.detector.network.member_probabilities(self._network_input("detection", x))
        members = members.float().cpu()
        ci = _covid_index(self._class_names(self.detector, _DEFAULT_DETECTION_CLASSES))
        p_covid = members[0, :, ci]  # (M,)
        res.covid_probability = float(p_covid.mean())
        res.covid_probability_spread = float(p_covid.std(correction=0))
        res.covid_member_probabilities = [float(v) for v in p_covid]
        res.prediction = "COVID-19" if res.covid_probability >= self.covid_threshold else "non-COVID-19"
        return ci

    def _grade(self, res: CTResult, x: torch.Tensor) -> None:
        """Fill the severity fields from the ``(1, a + b, H, W)`` stacks."""
        with torch.inference_mode(), self._autocast():
            mean, spread = self.grader.network.predict_with_spread(self._network_input("severity", x))
        mean, spread = mean.float().cpu(), spread.float().cpu()
        names = self._class_names(self.grader, _DEFAULT_SEVERITY_CLASSES)
        if len(names) != mean.shape[1]:
            names = [f"class_{i}" for i in range(mean.shape[1])]
        res.severity_probabilities = {n: float(p) for n, p in zip(names, mean[0])}
        res.severity_spread = {n: float(v) for n, v in zip(names, spread[0])}
        res.severity = names[int(mean[0].argmax())]

    def _mask_postprocessing(self) -> list:
        """Label-map clean-up transforms of the segmenter bundle's ``postprocessing`` (e.g.
        ``KeepLargestConnectedComponentd``), instantiated from its config so the pipeline's mask is the
        bundle's mask; activation, inversion, arg-max and saving are done here in-process instead."""
        config = self.segmenter.config
        if config is None or "postprocessing" not in config:
            return []
        raw = config["postprocessing"]
        items = raw.get("transforms", []) if isinstance(raw, dict) else []
        out = []
        for i, item in enumerate(items):
            target = str(item.get("_target_", "")) if isinstance(item, dict) else ""
            if target.split(".")[-1] in _MASK_POSTPROCESSING:
                transform = config.get_parsed_content(f"postprocessing#transforms#{i}")
                if transform is not None:  # None: switched off by the config's "_disabled_"
                    out.append(transform)
        return out

    def _segmentation_size(self) -> tuple[int, int]:
        """In-plane size the segmenter runs at, from its bundle (metadata ``spatial_shape`` or config)."""
        shape = (
            self.segmenter.config_value("spatial_size", "image_size", "roi_size")
            or self.segmenter.input_shape()
        )
        if not shape:
            raise ValueError(
                f"bundle {self.segmenter.bundle}: no input size (network_data_format.inputs.image.spatial_shape)"
            )
        return int(shape[-2]), int(shape[-1])

    def _autocast(self):
        """The forward passes' arithmetic context (:data:`PRECISIONS`)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _network_input(self, stage: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the device, in the stage's memory format."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last.get(stage):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _slice_batches(self, image: torch.Tensor, size: tuple[int, int], stage: str):
        """Yield ``(start, batch)`` with ``batch`` (B, 1, H, W) slices resized to ``size`` on the device."""
        vol = image[0]  # (X, Y, Z)
        for start in range(0, vol.shape[-1], self.batch_size):
            chunk = vol[:, :, start : start + self.batch_size].permute(2, 0, 1)[:, None]  # (B, 1, X, Y)
            chunk = chunk.to(self.device, non_blocking=True)
            if tuple(chunk.shape[-2:]) != size:
                chunk = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)
            yield start, self._network_input(stage, chunk)

    def _slice_filter_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """``(1, X, Y, Z)`` in [0, 1] -> ``(Z,)`` probability of the "lung" class per slice."""
        size = self._stack_size(self.slice_filter, (224, 224))
        names = [n.lower() for n in self._class_names(self.slice_filter, ("non-lung", "lung"))]
        lung = names.index("lung") if "lung" in names else 1
        out = []
        with torch.inference_mode(), self._autocast():
            for _, batch in self._slice_batches(image, size, "slice_filter"):
                out.append(torch.softmax(self.slice_filter.network(batch).float(), dim=1)[:, lung].cpu())
        return torch.cat(out)

    def _segment(self, image: torch.Tensor, clean: bool = True) -> np.ndarray:
        """``(1, X, Y, Z)`` in [0, 1] -> ``(X, Y, Z)`` uint8 lung mask in the input grid.

        Slices are resized to the segmenter's size, the class probabilities resized back (bilinear) and
        arg-maxed there, as the bundle's ``Activationsd`` + ``Invertd`` + ``AsDiscreted`` do, so the mask
        is as smooth as the probabilities rather than blocky. With two classes only P(lung) is resized
        and thresholded at 0.5: the same decision (resizing is linear, so the two stay complementary)
        at half the cost.
        """
        x_size = tuple(image.shape[1:3])
        mask = np.zeros(tuple(image.shape[1:]), dtype=np.uint8)
        with torch.inference_mode():
            for start, batch in self._slice_batches(image, self._seg_size, "segmentation"):
                with self._autocast():
                    logits = self.segmenter.network(batch)
                logits = logits.float()
                if logits.shape[1] == 2:
                    prob = torch.sigmoid(logits[:, 1:] - logits[:, :1])  # = softmax(logits)[:, 1:]
                else:
                    prob = torch.softmax(logits, dim=1)
                if tuple(prob.shape[-2:]) != x_size:
                    prob = F.interpolate(prob, size=x_size, mode="bilinear", align_corners=False)
                lab = prob[:, 0] > 0.5 if prob.shape[1] == 1 else prob.argmax(dim=1) > 0  # any lung label
                lab = lab.to(torch.uint8).cpu().numpy()  # (B, X, Y)
                mask[:, :, start : start + lab.shape[0]] = lab.transpose(1, 2, 0)
        return self._clean_mask(mask) if clean else mask

    def _clean_mask(self, mask: np.ndarray) -> np.ndarray:
        """The segmenter bundle's own label clean-up (:data:`_MASK_POSTPROCESSING`) on the 3D mask.

        Run on the mask's bounding box plus a one-voxel background margin, which gives the same result as
        on the whole volume for these transforms (components and holes live inside the box; the margin
        stands for the background outside it) at a fraction of the cost: MONAI's connected-component
        labelling of a 300x512x512 mask takes ~3 s and ~1 GB, of the lungs' box typically a quarter.
        """
        if not self._mask_post:
            return mask
        box = _bounding_box(mask, margin=1)
        if box is None:  # empty mask: nothing to clean
            return mask
        sub = np.ascontiguousarray(mask[box])
        for transform in self._mask_post:
            args = _binary_keep_largest_args(transform, sub)
            if args is not None:
                sub = _keep_largest_components(sub, *args)
                continue
            d = transform({key: torch.from_numpy(sub)[None] for key in transform.keys})
            sub = np.asarray(torch.as_tensor(d[transform.keys[0]])[0].cpu(), dtype=np.uint8)
        mask[box] = sub
        return mask

    @staticmethod
    def _class_names(stage: StageModel, default: Sequence[str]) -> list[str]:
        """Output class names: the bundle config's ``class_names``, else metadata ``channel_def``."""
        names = stage.config_value("class_names") or stage.channel_names() or default
        return [str(n) for n in names]

    @staticmethod
    def _stack_size(stage: StageModel, default: tuple[int, int]) -> tuple[int, int]:
        """In-plane size of a stack network: config ``spatial_size``, else metadata ``spatial_shape``."""
        shape = stage.config_value("spatial_size") or stage.input_shape() or default
        return int(shape[-2]), int(shape[-1])

    def _detection_input(self, kept_image: torch.Tensor, kept_mask: torch.Tensor) -> torch.Tensor:
        """``(1, depth, H, W)``: kept slices resampled; lung-masked if the bundle's ``mask_lung`` says so."""
        from ctcovid.transforms import BuildDetectionInput

        depth = int(getattr(self.detector.network.members[0], "in_slices", 64))
        size = self._stack_size(self.detector, (224, 224))
        mask = kept_mask if self.detector.config_value("mask_lung", default=True) else None
        return torch.as_tensor(BuildDetectionInput(depth=depth, spatial_size=size)(kept_image, mask))[None]

    def _severity_input(self, kept_image: torch.Tensor, kept_mask: torch.Tensor) -> torch.Tensor:
        """``(1, a + b, H, W)``: the two depth stacks; lung-masked unless the bundle's ``mask_lung`` is false."""
        from ctcovid.transforms import BuildSeverityInput

        member = self.grader.network.members[0]
        depths = (int(getattr(member, "slices_a", 32)), int(getattr(member, "slices_b", 16)))
        size = self._stack_size(self.grader, (299, 299))
        mask = kept_mask if self.grader.config_value("mask_lung", default=True) else None
        return torch.as_tensor(BuildSeverityInput(depths=depths, spatial_size=size)(kept_image, mask))[None]

    def _gradcam_layer(self, member: torch.nn.Module) -> str:
        """Target layer: the bundle's ``gradcam_target_layer`` or the member's ``gradcam_layer`` if set,
        else the backbone's last feature block (DenseNet ``features.norm5``: last dense block + BN + ReLU)."""
        configured = self.detector.config_value("gradcam_target_layer") or getattr(
            member, "gradcam_layer", None
        )
        if configured:
            return str(configured)
        names = dict(member.named_modules())
        for candidate in ("backbone.features.norm5", "backbone.features"):
            if candidate in names:
                return candidate
        convs = [n for n, m in member.named_modules() if isinstance(m, torch.nn.Conv2d)]
        return convs[-1]

    def _gradcam(self, x: torch.Tensor, class_index: int, out_size: Sequence[int]) -> tuple[np.ndarray, str]:
        """Mean Grad-CAM over the detection members for ``class_index`` -> ``(X, Y)`` map in [0, 1].

        The stack's slices are the channels of one 2D input, so each member gives one in-plane map
        ``(H, W)``; members are averaged (each map is already scaled to [0, 1]) and the mean is resized
        to the scan's in-plane size (the stack was made by resizing whole slices, no cropping).
        """
        from ctcovid.visualize.gradcam import gradcam_heatmap

        maps = []
        layer = ""
        x = self._network_input("detection", x)
        for member in self.detector.network.members:
            layer = self._gradcam_layer(member)
            # always fp32: under bf16 the maps moved too much (Pearson r 0.80 against fp32 on a real scan,
            # benchmarks/results/ct_pipeline.json) for an explanation that should not depend on a speed option
            maps.append(np.asarray(gradcam_heatmap(member, x, layer, class_index=class_index)))
        heat = torch.from_numpy(np.mean(maps, axis=0).astype(np.float32))[None, None]
        heat = F.interpolate(
            heat, size=tuple(int(s) for s in out_size), mode="bilinear", align_corners=False
        )[0, 0]
        heat = heat.clamp(0, 1).numpy()
        if not math.isfinite(float(heat.sum())):
            heat = np.nan_to_num(heat)
        return heat, layer
