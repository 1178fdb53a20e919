"""The end-to-end CT pipeline: scan on disk -> lung mask, COVID-19 probability, severity grade.

The pipeline reads the scan, normalises it once per distinct bundle setting, then runs its stages in
order on one per-scan :class:`~ctcovid.ct.context.ScanContext` (CNR-IEMN COV19D approach; one module
per stage under :mod:`ctcovid.ct.stages`)::

    read (ctcovid.io.load_ct) -> normalise intensity to [0, 1] by domain (HU lung window / display percentiles)
    slice_filter     ResNeXt-50 per slice -> P(lung slice)            (bundle ct_lung_slice_filter, optional)
    segmentation     Attention U-Net per slice + 3D clean-up -> mask  (bundle ct_lung_segmentation)
    slice_selection  kept slices: filter probabilities, or lung-mask area without the filter
    infection        U-Net per kept slice -> lesion mask, involvement per lung, CT-0..4 (ct_lung_infection_segmentation)
    detection        kept slices stacked -> P(COVID-19), spread, Grad-CAM (bundle ct_covid_classification)
    severity         lung-masked 32 + 16 slice stacks -> P(mild..critical) (bundle ct_covid_severity_classification)

Each network comes from its bundle (``network_def`` of ``configs/inference.json`` + ``models/model.pt``,
see :mod:`ctcovid.bundle.loading`). What the bundle defines, the stages read from it rather than from
constants: input sizes, class names, ``mask_lung``, the slice-filter ``threshold``, ``lung_min_area``,
``NormalizeCTIntensityd`` arguments and the segmenter's label clean-up. Use :class:`CTCovidPipeline`
from Python and :func:`ctcovid.running.batch.run_batch` (``ctcovid predict``) for folders of scans.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctcovid.bundle.loading import StageModel, load_stage
from ctcovid.io.errors import CTInputError
from ctcovid.networks import batchnorm_folding, instance_norm
from ctcovid.running.device import resolve_device

from .context import NormalizedViews, ScanContext
from .network_runner import PRECISIONS, NetworkRunner
from .result import CTResult
from .stages import (
    DetectionStage,
    InfectionSegmentationStage,
    LungSegmentationStage,
    SeverityStage,
    SliceFilterStage,
    SliceSelectionStage,
    Stage,
)
from .stages.severity import SEVERITY_MODES

__all__ = [
    "CTCovidPipeline",
    "DEFAULT_BUNDLES",
    "PRECISIONS",
    "SEVERITY_MODES",
    "STAGES",
    "STAGE_TYPES",
]

#: The stages in run order. A new stage is a module in :mod:`ctcovid.ct.stages` and one line here.
STAGE_TYPES: tuple[type[Stage], ...] = (
    SliceFilterStage,
    LungSegmentationStage,
    SliceSelectionStage,
    InfectionSegmentationStage,
    DetectionStage,
    SeverityStage,
)

#: Bundle of each network, by model key.
DEFAULT_BUNDLES = {t.model: t.default_bundle for t in STAGE_TYPES if t.model}

#: Keys of ``timings_s`` in run order (``read`` includes intensity normalisation; ``volume_building``
#: makes the detection and severity stacks from the kept slices; ``gradcam`` explains ``detection``).
STAGES = tuple(dict.fromkeys(("read", *(k for t in STAGE_TYPES for k in t.timings))))

#: Arguments of ``NormalizeCTIntensity(d)`` taken over from a bundle's preprocessing.
_NORM_ARGS = ("domain", "center", "width", "lower", "upper", "ignore_zeros")


class CTCovidPipeline:
    """COVID-19 detection and severity grading for one CT scan at a time (networks loaded once).

    Args:
        bundle_dir: folder holding the bundles (default :func:`ctcovid.bundle.bundles_root`).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_size: slices per forward pass in the slice-level stages (slice filter, segmentation);
            default :data:`~ctcovid.ct.network_runner.DEFAULT_BATCH_SIZE` of the device type and precision.
        precision: one of :data:`~ctcovid.ct.network_runner.PRECISIONS`; ``"bf16"`` runs the network forward passes under
            ``torch.autocast`` in bfloat16. Inputs, outputs, the mask decision and Grad-CAM stay float32.
        channels_last: run the networks (and their inputs) in channels-last memory format. ``None``: each
            bundle's ``channels_last`` config value decides (set where it measured faster:
            ``benchmarks/results/ct_memory_format.json``). Results are the same up to float rounding.
        fold_batchnorm: fold the batch norms of the slice-level networks (slice filter, segmenter) into
            their convolutions once the weights are loaded (:func:`ctcovid.networks.fold_batchnorm`): the
            same function up to float rounding, 15-26 % faster per call on a 2-core CPU
            (``benchmarks/results/ct_batchnorm_folding.json``); :attr:`folded_batchnorms` counts
            them per stage. The same flag runs their instance norms as the equivalent group norms
            (:func:`ctcovid.networks.instance_norms_as_group_norms`, :attr:`swapped_instance_norms`):
            PyTorch's CPU group norm kernel is 3x faster and keeps channels-last (the U-Nets: -11 to
            -15 %). The ensembles are left as built (Grad-CAM reads the detection members' layers, and
            their timm norm+activation layers do not fold this way).
        flush_denormal: on CPU, flush denormal floats to zero (``torch.set_flush_denormal``). Off by
            default because it is process-wide processor state that other code can notice (numpy and
            hypothesis see subnormals vanish); ``ctcovid predict``/``demo``, which own their process, turn
            it on:
            deep layers can produce values below 1e-38 whose arithmetic is 10-20x slower on x86 (the
            randomly initialised Inception ensemble once measured 6.5 s instead of 0.8 s here); zeroing
            them changes nothing visible. It sets the calling thread's FTZ/DAZ flags, which the intra-op
            worker threads inherit when they start after it (set before the first parallel op).
        severity: one of :data:`~ctcovid.ct.stages.severity.SEVERITY_MODES`.
        skip_missing: (default) stages whose bundle has no ``models/model.pt`` are skipped, and every
            result says so (``stages``, ``summary.csv``'s ``*_status`` columns); ``False`` raises
            :class:`~ctcovid.bundle.MissingWeightsError` instead (``ctcovid predict --require-all``), for
            scripts that need every answer. The slice filter is optional anyway (lung-mask area decides
            without it); the lung segmenter is always required.
        allow_2d: accept single-slice inputs (one DICOM file, one image) as 1-slice scans.
        covid_threshold: P(COVID-19) at or above which a scan is predicted COVID-19.
        gradcam: compute the Grad-CAM heat map of the detection ensemble.
        slice_threshold: lung probability at or above which the slice filter keeps a slice; default: the
            slice-filter bundle's ``threshold``, else 0.5.
        min_lung_area: without slice-filter weights, a slice is lung when its mask covers at least this
            fraction of the slice (:class:`ctcovid.transforms.LungSlicesFromMask`); default: the
            detection bundle's ``lung_min_area`` (the rule its training data went through), else 0.01.
        bundles: override the bundle name of a stage, e.g. ``{"detection": "my_detector"}``.
        assign_dicom_uids: a DICOM series whose export dropped the UIDs a DICOM SEG must reference (anonymised
            data) gets its SEG against ``<scan>_dicom/``, a copy of the series with UIDs assigned, written
            with it (:mod:`ctcovid.io.dicom_uids`); off (default): no SEG for it, and the record says why.

    Calling the pipeline on a path returns a :class:`CTResult` and raises a
    :class:`~ctcovid.io.errors.CTInputError` subclass for unusable input (no lung slices included).
    """

    #: the class of :meth:`process`'s results (what :func:`ctcovid.running.batch.run_batch` writes)
    result_type = CTResult

    def __init__(
        self,
        bundle_dir: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
        severity: str = "covid",
        skip_missing: bool = True,
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
        assign_dicom_uids: bool = False,
    ) -> None:
        if severity not in SEVERITY_MODES:
            raise ValueError(f"severity must be one of {SEVERITY_MODES}, got {severity!r}")
        device = resolve_device(device)
        self.runner = NetworkRunner(device, precision, batch_size)  # checks precision and batch size
        if flush_denormal and device.type == "cpu":
            torch.set_flush_denormal(True)
        self.severity_mode = severity
        self.allow_2d = bool(allow_2d)
        self.covid_threshold = float(covid_threshold)
        self.use_gradcam = bool(gradcam)
        self.assign_dicom_uids = bool(assign_dicom_uids)
        self.bundle_dir = bundle_dir
        self.stages: list[Stage] = [t() for t in STAGE_TYPES]
        names = {**DEFAULT_BUNDLES, **(bundles or {})}
        rule = {"optional": True, "required": False, "skippable": skip_missing}
        self.models: dict[str, StageModel] = {
            s.model: load_stage(s.model, names[s.model], bundle_dir, device, skip_missing=rule[s.weights])
            for s in self.stages
            if s.model
        }
        self.folded_batchnorms = {
            s.model: batchnorm_folding.fold_batchnorm(self.models[s.model].network) if fold_batchnorm else 0
            for s in self.stages
            if s.fold_batchnorm and self.models[s.model].available
        }
        self.swapped_instance_norms = {
            key: instance_norm.instance_norms_as_group_norms(self.models[key].network) if fold_batchnorm else 0
            for key in self.folded_batchnorms
        }
        self.runner.channels_last = {
            key: bool(m.config_value("channels_last", default=False) if channels_last is None else channels_last)
            for key, m in self.models.items()
            if m.available
        }
        for key, use in self.runner.channels_last.items():
            if use:
                self.models[key].network.to(memory_format=torch.channels_last)
        # each model normalises intensities as its bundle's preprocessing does (NormalizeCTIntensityd args)
        self.normalization_args = {
            key: m.transform_args("NormalizeCTIntensityd", _NORM_ARGS) or {}
            for key, m in self.models.items()
            if m.available
        }
        if slice_threshold is None:
            slice_threshold = self.models["slice_filter"].config_value("threshold", default=0.5)
        self.slice_threshold = float(slice_threshold)
        if min_lung_area is None:  # the rule the detection bundle's training data went through
            min_lung_area = self.models["detection"].config_value("lung_min_area", default=0.01)
        self.min_lung_area = float(min_lung_area)
        for stage in self.stages:
            stage.setup(self)

    # ------------------------------------------------------------------ settings and provenance
    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def precision(self) -> str:
        return self.runner.precision

    @property
    def batch_size(self) -> int:
        return self.runner.batch_size

    @property
    def channels_last(self) -> dict[str, bool]:
        return self.runner.channels_last

    @property
    def slice_filter(self) -> StageModel:
        return self.models["slice_filter"]

    @property
    def segmenter(self) -> StageModel:
        return self.models["segmentation"]

    @property
    def detector(self) -> StageModel:
        return self.models["detection"]

    @property
    def grader(self) -> StageModel:
        return self.models["severity"]

    @property
    def infection_segmenter(self) -> StageModel:
        return self.models["infection"]

    def stage(self, name: str) -> Stage:
        """The stage called ``name`` (e.g. ``"segmentation"``)."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} (stages: {[s.name for s in self.stages]})")

    def model_versions(self) -> dict[str, dict]:
        """Per model ``{bundle, version, weights_sha256, status}`` (part of every result and resume key)."""
        return {key: m.provenance() for key, m in self.models.items()}

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
            # only when on: the keys of runs without it stay as they were
            **({"assign_dicom_uids": True} if self.assign_dicom_uids else {}),
        }

    def run_info(self) -> dict[str, Any]:
        """How results are computed here (the ``run`` part of every record): device, precision, batch size
        and the ctcovid / torch / MONAI versions."""
        import monai

        from ctcovid import __version__

        return {
            "device": str(self.device),
            "precision": self.precision,
            "batch_size": self.batch_size,
            "ctcovid": __version__,
            "torch": torch.__version__,
            "monai": monai.__version__,
        }

    def skipped_stages(self) -> dict[str, str]:
        """``{model key: why}`` for network stages that will not run for lack of weights."""
        return {key: m.skipped for key, m in self.models.items() if not m.available}

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
        """Run the stages on a volume from :meth:`read`.

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
            from ctcovid.running.scans import scan_name

            scan_id = scan_name(Path(src)) if src else "scan"
        res = CTResult(
            scan_id=scan_id,
            path=src,
            models=self.model_versions(),
            covid_threshold=self.covid_threshold,
            run=self.run_info(),
            assign_dicom_uids=self.assign_dicom_uids,
        )
        if read_seconds is not None:
            res.timings_s["read"] = read_seconds
        res.stages["read"] = "ok"
        _describe(res, volume, meta)
        ctx = ScanContext(res, NormalizedViews(volume, self.normalization_args), src, on_stage or (lambda _s: None))
        del volume  # from here on only the views hold the scan's own intensities, until they release them

        with ctx.timed("normalize"):
            ctx.image = ctx.views.get(self.segmenter)  # (1, X, Y, Z) in [0, 1]
            ctx.views.release_source([m for m in self.models.values() if m.available])
        res.image = ctx.image[0].numpy()
        for stage in self.stages:
            stage.run(self, ctx)
        return res


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
    res.input_notes = [n for n in str(meta.get("input_notes") or "").split("\n") if n]
    drift = [float(v) for v in meta.get("tilt_drift_voxels", (0.0, 0.0))]
    res.tilt_drift_voxels = drift if any(drift) else None
    res.input_orientation = str(meta.get("input_orientation") or "") or None
