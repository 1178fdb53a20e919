"""MONAI Label infer tasks over the CT pipeline.

- :class:`LungSegmentationInfer` (type ``segmentation``, so the Slicer module lists it): the lung mask as a
  0/1 label NIfTI in the study's own voxel grid (same shape and affine), and in the result JSON the
  COVID-19 probability with its member spread and the severity class probabilities.
- :class:`LungInfectionSegmentationInfer` (type ``segmentation``): lung 1 and lesions 2 in one label NIfTI
  (the lung includes its lesions), with lung involvement, per-lung numbers and the CT-0..CT-4 grade.
- :class:`CovidClassificationInfer` (type ``classification``): the detection or the severity ensemble's
  result as JSON only, for clients that call the REST API directly.

Every task runs the whole pipeline (the classifiers need the lung mask and the lung slices). A stage
without trained weights is reported, not faked: its probabilities are ``null`` and ``reasons`` says why.
Bad input becomes an HTTP 4xx whose ``detail`` names the study and the problem (the server keeps serving).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ctcovid.bundle.loading import BundleError, MissingWeightsError
from ctcovid.ct.pipeline import DEFAULT_BUNDLES, CTResult
from ctcovid.io.errors import CTInputError

from .runner import PipelineRunner

__all__ = [
    "CovidClassificationInfer",
    "CTPipelineInfer",
    "INFECTION_LABELS",
    "LungInfectionSegmentationInfer",
    "LungSegmentationInfer",
    "LUNG_LABELS",
]

logger = logging.getLogger(__name__)

#: Label values of the returned mask (what Slicer names the segments by).
LUNG_LABELS = {"lung": 1}
#: Label values of the lung + lesion map (a lesion voxel is lung too; it is labelled 2).
INFECTION_LABELS = {"lung": 1, "infection": 2}


class CTPipelineInfer(InferTask):
    """Base: runs the shared :class:`~ctcovid.label.runner.PipelineRunner` on the request's image.

    Args:
        runner: the app's pipeline runner.
        type: MONAI Label model type.
        labels: label names (segmentation) or class names (classification).
        description: shown by the Slicer module.
        stages: pipeline stages this model reports (their weight status goes into ``/info/``).
    """

    def __init__(
        self,
        runner: PipelineRunner,
        type: InferType | str,
        labels: dict[str, int] | list[str],
        description: str,
        stages: tuple[str, ...],
    ) -> None:
        super().__init__(type=type, labels=labels, dimension=3, description=description)
        self.runner = runner
        self.stages = stages

    def is_valid(self) -> bool:
        return True  # listed even without weights: /info/ and the results say what is missing

    def info(self) -> dict[str, Any]:
        i = super().info()
        status = self.runner.status()
        i["bundles"] = {s: status[s] for s in self.stages}
        missing = [f"{s}: {status[s]['message']}" for s in self.stages if not status[s].get("weights")]
        i["weights_missing"] = missing
        return i

    def run_pipeline(self, request: dict) -> tuple[CTResult, float, bool]:
        """Run the pipeline on ``request["image"]`` -> (result, seconds, from cache); failures -> HTTP errors."""
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise HTTPException(status_code=400, detail="this model needs an image id or an uploaded NIfTI file")
        t0 = time.perf_counter()
        try:
            result, cached = self.runner.run(image)
        except CTInputError as e:
            raise HTTPException(status_code=422, detail=f"cannot use this study: {e}") from e
        except (MissingWeightsError, BundleError) as e:  # the server works; this model cannot run yet
            raise HTTPException(status_code=503, detail=f"model not available: {e}") from e
        return result, time.perf_counter() - t0, cached

    @staticmethod
    def summary(result: CTResult) -> dict[str, Any]:
        """Key numbers of a result for the JSON answer (``record`` keeps the whole pipeline record)."""
        record = result.to_dict()
        reasons = {}
        if result.covid_probability is None:
            reasons["detection"] = result.stages.get("detection", "not run")
        if result.severity_probabilities is None:
            reasons["severity"] = result.stages.get("severity", "not run")
        if result.lung_involvement_percent is None:
            reasons["infection"] = result.stages.get("infection", "not run")
        return {
            "covid_probability": result.covid_probability,
            "covid_probability_spread": result.covid_probability_spread,
            "covid_member_probabilities": result.covid_member_probabilities,
            "covid_threshold": result.covid_threshold,
            "prediction": result.prediction,
            "severity_probabilities": result.severity_probabilities,
            "severity_spread": result.severity_spread,
            "severity": result.severity,
            "reasons": reasons,
            "lung_volume_ml": result.lung_volume_ml,
            "infection_volume_ml": result.infection_volume_ml,
            "lung_involvement_percent": result.lung_involvement_percent,
            "lungs": result.lungs,
            "ct_severity_grade": result.ct_severity_grade,
            "ct_severity_source": result.ct_severity_source,
            "slices_kept": result.slices_kept,
            "slices_read": result.slices_read,
            "record": record,
        }

    def answer_with_labels(
        self, result: CTResult, labels, label_names: dict[str, int], seconds: float, cached: bool
    ) -> tuple[str, dict]:
        """Write the ``labels`` map (study grid, the reader's affine) to a temporary NIfTI for MONAI Label to
        send, and the JSON answer beside it: label names, :meth:`summary`, cache flag and latencies."""
        from ctcovid.io.atomic import write_nifti_atomic

        t0 = time.perf_counter()
        fd, out = tempfile.mkstemp(prefix=f"ctcovid_{'_'.join(label_names)}_", suffix=".nii.gz")
        os.close(fd)
        # back in the study file's own voxel order (a non-axial study was reoriented for the networks)
        write_nifti_atomic(*result.in_input_order(labels.astype("uint8")), out)
        answer = {"label_names": dict(label_names), **self.summary(result), "cached": cached}
        answer["latencies"] = _latencies(result, seconds, time.perf_counter() - t0, cached)
        return out, answer

    def __call__(self, request: dict) -> tuple[str | None, dict]:  # pragma: no cover - abstract
        raise NotImplementedError


class LungSegmentationInfer(CTPipelineInfer):
    """Lung mask (label NIfTI, study geometry) + COVID-19 probability and severity probabilities (JSON)."""

    def __init__(self, runner: PipelineRunner) -> None:
        super().__init__(
            runner,
            type=InferType.SEGMENTATION,
            labels=dict(LUNG_LABELS),
            description=(
                "Lung mask of the CT (Attention U-Net, bundle ct_lung_segmentation); the result JSON also has "
                "P(COVID-19) with its member spread and the severity class probabilities (null with the reason "
                "when a model has no trained weights)"
            ),
            stages=("segmentation", "slice_filter", "detection", "severity"),
        )

    def get_path(self, validate: bool = True) -> str | None:
        # /model/lung_segmentation reports (and PUT replaces) the segmenter weights; a replacement goes to
        # the app's fine-tuned bundle, never over the shipped bundle
        if not validate:
            return str(self.runner.finetuned_bundle / "models" / "model.pt")
        path = self.runner.segmentation_weights()
        return str(path) if path.is_file() else None

    def __call__(self, request: dict) -> tuple[str | None, dict]:
        result, seconds, cached = self.run_pipeline(request)
        return self.answer_with_labels(result, result.lung_mask, LUNG_LABELS, seconds, cached)


class LungInfectionSegmentationInfer(CTPipelineInfer):
    """Lung (1) and lesion (2) label NIfTI in the study geometry + involvement and CT grade (JSON)."""

    def __init__(self, runner: PipelineRunner) -> None:
        super().__init__(
            runner,
            type=InferType.SEGMENTATION,
            labels=dict(INFECTION_LABELS),
            description=(
                "COVID-19 lesions (ground glass, consolidation) inside the lungs (bundle "
                f"{DEFAULT_BUNDLES['infection']}) with the lung mask; the result JSON has lung involvement "
                "(both lungs, each lung) and the CT-0..CT-4 grade"
            ),
            stages=("segmentation", "slice_filter", "infection"),
        )

    def get_path(self, validate: bool = True) -> str | None:
        if not validate:
            return str(self.runner.finetuned_bundle_of("infection") / "models" / "model.pt")
        path = self.runner.segmentation_weights("infection")
        return str(path) if path.is_file() else None

    def __call__(self, request: dict) -> tuple[str | None, dict]:
        result, seconds, cached = self.run_pipeline(request)
        if result.infection_mask is None:
            raise HTTPException(
                status_code=503, detail=f"model not available: infection {result.stages.get('infection', 'not run')}"
            )
        labels = result.lung_mask.astype("uint8")  # 0/1
        labels[result.infection_mask > 0] = INFECTION_LABELS["infection"]
        return self.answer_with_labels(result, labels, INFECTION_LABELS, seconds, cached)


class CovidClassificationInfer(CTPipelineInfer):
    """COVID-19 detection or severity grading as JSON (no label file).

    Args:
        runner: the app's pipeline runner.
        stage: ``"detection"`` or ``"severity"``.
    """

    def __init__(self, runner: PipelineRunner, stage: str) -> None:
        if stage == "detection":
            labels = ["non-COVID-19", "COVID-19"]
            description = (
                f"P(COVID-19): mean and spread over the detection ensemble (bundle {DEFAULT_BUNDLES['detection']})"
            )
        elif stage == "severity":
            labels = ["mild", "moderate", "severe", "critical"]
            description = (
                "Severity class probabilities, mean and spread over the severity ensemble "
                f"(bundle {DEFAULT_BUNDLES['severity']}); graded on scans predicted COVID-19 unless the app "
                "runs with --conf severity always"
            )
        else:
            raise ValueError(f"stage must be 'detection' or 'severity', got {stage!r}")
        super().__init__(
            runner,
            type=InferType.CLASSIFICATION,
            labels=labels,
            description=description,
            stages=("segmentation", stage) if stage == "detection" else ("segmentation", "detection", stage),
        )
        self.stage = stage

    def __call__(self, request: dict) -> tuple[str | None, dict]:
        result, seconds, cached = self.run_pipeline(request)
        s = self.summary(result)
        if self.stage == "detection":
            p = result.covid_probability
            answer = {
                "available": p is not None,
                "reason": s["reasons"].get("detection"),
                "covid_probability": p,
                "covid_probability_spread": s["covid_probability_spread"],
                "member_probabilities": s["covid_member_probabilities"],
                "threshold": result.covid_threshold,
                "prediction": result.prediction,
            }
        else:
            answer = {
                "available": result.severity_probabilities is not None,
                "reason": s["reasons"].get("severity"),
                "probabilities": result.severity_probabilities,
                "spread": result.severity_spread,
                "grade": result.severity,
                "covid_probability": result.covid_probability,
            }
        answer["record"] = s["record"]
        answer["cached"] = cached
        answer["latencies"] = _latencies(result, seconds, 0.0, cached)
        return None, answer


def _latencies(result: CTResult, seconds: float, write_s: float, cached: bool) -> dict[str, Any]:
    """MONAI Label style latencies (seconds): pre = reading, infer = the network stages, post = writing.

    ``stages`` are the pipeline's own timings, from the run that made the (possibly cached) result.
    """
    pre = 0.0 if cached else float(result.timings_s.get("read", 0.0))
    return {
        "pre": round(pre, 3),
        "infer": round(max(seconds - pre, 0.0), 3),
        "post": round(write_s, 3),
        "total": round(seconds + write_s, 3),
        "stages": {k: round(v, 3) for k, v in result.timings_s.items()},
    }
