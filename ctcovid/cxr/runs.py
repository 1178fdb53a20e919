"""Running the X-ray cascade over many image files with the shared batch runner (:func:`run_cascade`: per
image ``<id>.json`` and ``<id>_gradcam.png``, and ``summary.csv``; a bad file is recorded with its reason and
the run goes on; a re-run resumes), and scoring it on labelled images (:func:`evaluate_cascade`, 4 classes)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ctcovid.io.atomic import write_csv_atomic, write_json_atomic
from ctcovid.io.errors import CTInputError
from ctcovid.running.batch import BatchReport

from .cascade import CXRCascade
from .result import FINAL_LABELS, SUMMARY_FIELDS, SUMMARY_NAME, CXRResult

__all__ = ["CascadeBatch", "CascadeRunRecord", "cascade_scores", "evaluate_cascade", "run_cascade"]

logger = logging.getLogger(__name__)


@dataclass
class CascadeRunRecord:
    """One image of a cascade run: the cascade's answer and what a resumable batch run keeps with it (the
    result type :func:`ctcovid.running.batch.run_batch` needs). Its JSON record is ``<id>.json``."""

    SUMMARY_FIELDS: ClassVar[tuple[str, ...]] = SUMMARY_FIELDS
    image_id: str
    result: CXRResult
    warnings: list[str] = field(default_factory=list)
    input_sha256: str | None = None
    resume_key: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def output_names(image_id: str) -> list[str]:
        # the Grad-CAM overlay is optional (--no-gradcam), so resume checks the JSON record alone
        return []

    @classmethod
    def failed(cls, scan_id: str, path: str, reason: str, models: dict | None = None, **fields: Any):
        return cls(scan_id, CXRResult(image=path, status="failed", reason=reason, models=models or {}), **fields)

    @staticmethod
    def summary_row_from_record(record: dict, scan_id: str, path: str, status: str, reason: str) -> dict:
        known = {f.name for f in fields(CXRResult)}
        result = CXRResult(**{k: v for k, v in record.items() if k in known})
        return {**result.summary_row(scan_id), "image": path, "status": status, "reason": reason}

    def to_dict(self) -> dict:
        return {
            "id": self.image_id,
            **self.result.to_dict(),
            "warnings": list(self.warnings),
            "input_sha256": self.input_sha256,
            "resume_key": self.resume_key,
            "timings_s": {k: round(v, 4) for k, v in self.timings_s.items()},
        }

    def summary_row(self) -> dict:
        return self.result.summary_row(self.image_id)

    def save(self, out_dir: str | os.PathLike) -> None:
        write_json_atomic(self.to_dict(), Path(out_dir) / f"{self.image_id}.json")


class CascadeBatch:
    """The cascade as a :class:`~ctcovid.running.batch.BatchPipeline`: images are read ahead, each one's
    Grad-CAM overlay goes to ``out_dir/<id>_gradcam.png``."""

    result_type = CascadeRunRecord

    def __init__(self, cascade: CXRCascade, out_dir: str | os.PathLike, gradcam: bool = True) -> None:
        self.cascade, self.out_dir, self.gradcam = cascade, Path(out_dir), bool(gradcam)

    def read(self, path: str | os.PathLike):
        from ctcovid.io import load_xray

        return load_xray(path)

    def process(self, volume, path=None, scan_id=None, read_seconds=None, on_stage=None) -> CascadeRunRecord:
        overlay = self.out_dir / f"{scan_id}_gradcam.png" if self.gradcam else None
        result = self.cascade.predict(path, overlay_path=overlay, image=volume)
        if result.overlay_png:
            result.overlay_png = Path(result.overlay_png).name
        record = CascadeRunRecord(scan_id, result, list(self.cascade.warnings))
        if read_seconds is not None:
            record.timings_s["read"] = read_seconds
        return record

    def model_versions(self) -> dict[str, dict]:
        return {stage: dict(p) for stage, p in self.cascade.models().items() if isinstance(p, dict)}

    def options(self) -> dict[str, Any]:
        """What changes results besides the images and weights (part of the resume key)."""
        return {
            "gradcam": self.gradcam,
            "viral_threshold": self.cascade.threshold,
            "spatial_size": [self.cascade.stage1.spatial_size, self.cascade.stage2.spatial_size],
        }


def _unique_ids(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique with ``_2``, ``_3`` ... (two ``image.png`` from different folders)."""
    seen: dict[str, int] = {}
    ids = []
    for p in paths:
        stem = p.name
        for suffix in (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        ids.append(stem if n == 1 else f"{stem}_{n}")
    return ids


def run_cascade(
    cascade: CXRCascade,
    images: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    gradcam: bool = True,
    progress: Callable[[int, int, dict], None] | None = None,
    force: bool = False,
    workers: int = 1,
) -> BatchReport:
    """Run the cascade over image files, writing ``<id>.json``, ``<id>_gradcam.png`` and ``summary.csv``.

    The shared batch runner (:func:`ctcovid.running.batch.run_batch`) does the work: a file that cannot be
    read (any :class:`~ctcovid.io.errors.CTInputError`) or that fails in the networks gets
    ``status = "failed"`` and the reason, in its JSON and its summary row, and the run goes on;
    ``summary.csv`` is rewritten (atomically) after every image; an image already done with the same
    content, weights and options is not recomputed (its row is rebuilt from its record, ``reused`` true) unless
    ``force``.

    Args:
        progress: called as ``progress(i, n, row)`` after each image.
        workers: images read ahead in background threads.
    """
    from ctcovid.running.batch import run_batch
    from ctcovid.running.scans import ScanInput

    paths = [Path(p) for p in images]
    scans = [ScanInput(p, image_id) for p, image_id in zip(paths, _unique_ids(paths))]
    return run_batch(
        scans,
        out_dir,
        CascadeBatch(cascade, out_dir, gradcam),
        force=force,
        workers=workers,
        progress=False,
        log=lambda msg: logger.warning("%s", msg),
        summary_name=SUMMARY_NAME,
        on_row=progress,
    )


def cascade_scores(result: CXRResult) -> np.ndarray:
    """Continuous 4-class scores ``[p_normal, p_bacterial, p_viral * q_other, p_viral * q_covid]``.

    ``q`` are stage 2's probabilities, so ``result`` must come from ``predict(..., stage2_for_all=True)``.
    Used only for ROC/AUC; the cascade's decision (the threshold) gives the labels.
    """
    s1, s2 = result.stage1_probabilities, result.stage2_probabilities
    if s2 is None:
        raise ValueError(f"{result.image}: no stage-2 probabilities (predict with stage2_for_all=True)")
    pv = s1["viral"]
    return np.array([s1["normal"], s1["bacterial"], pv * s2["viral-other"], pv * s2["COVID-19"]], dtype=np.float64)


def evaluate_cascade(
    cascade: CXRCascade,
    items: Sequence[dict],
    out_dir: str | os.PathLike,
    title: str = "cascade",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Evaluate the whole cascade on labelled images (4 classes: :data:`FINAL_LABELS`).

    Args:
        cascade: the cascade.
        items: dicts with ``image`` (path) and ``label`` (a name from :data:`FINAL_LABELS` or its index).
        out_dir: gets ``report.json``, ``predictions.csv``, ``confusion_matrix.png``, ``roc.png``.
        title: figure title prefix.
        progress: called as ``progress(done, total)`` before each image.

    Sensitivity, specificity, precision, F1, accuracy and the confusion matrix are those of the cascade's
    decisions (threshold included). AUC and the ROC curves rank the continuous scores of
    :func:`cascade_scores` (stage 2 run on every image for that purpose only). Unreadable images are listed
    under ``failed`` and left out.
    """
    from ctcovid.metrics.classification import classification_report

    from .evaluation import write_evaluation_figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels, scores, decisions, names, failed = [], [], [], [], []
    for i, it in enumerate(items):
        if progress is not None:
            progress(i, len(items))
        y = it["label"] if isinstance(it["label"], int) else FINAL_LABELS.index(it["label"])
        try:
            r = cascade.predict(it["image"], stage2_for_all=True)
        except CTInputError as e:
            failed.append({"image": str(it["image"]), "reason": str(e)})
            continue
        labels.append(y)
        scores.append(cascade_scores(r))
        decisions.append(FINAL_LABELS.index(r.label))
        names.append(str(it.get("name", it["image"])))
    t = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1, len(FINAL_LABELS))
    onehot = np.eye(len(FINAL_LABELS))[np.asarray(decisions, dtype=np.int64)]
    report = classification_report(t, onehot, FINAL_LABELS)
    ranked = classification_report(t, s, FINAL_LABELS)
    for c in FINAL_LABELS:
        report["per_class"][c]["auc"] = ranked["per_class"][c]["auc"]
    report["macro"]["auc"] = ranked["macro"]["auc"]
    report["class_balance"] = {c: int((t == i).sum()) for i, c in enumerate(FINAL_LABELS)}
    report["viral_threshold"] = cascade.threshold
    report["passed_threshold"] = int(sum(1 for d in decisions if FINAL_LABELS[d] in ("viral-other", "COVID-19")))
    report["notes"] = (
        "labels = cascade decisions (stage 1, viral threshold, stage 2); AUC/ROC rank the scores "
        "[p_normal, p_bacterial, p_viral*q_viral-other, p_viral*q_COVID-19] with stage 2 run on every image"
    )
    report["failed"] = failed
    report["models"] = cascade.models()
    report["figures"] = write_evaluation_figures(report, t, s, out, title)
    rows = [
        {"image": n, "true": FINAL_LABELS[ti], "predicted": FINAL_LABELS[di],
         **{f"score_{c}": f"{v:.6f}" for c, v in zip(FINAL_LABELS, si)}}
        for n, ti, di, si in zip(names, t, decisions, s)
    ]
    write_csv_atomic(rows, ["image", "true", "predicted", *[f"score_{c}" for c in FINAL_LABELS]], out / "predictions.csv")
    write_json_atomic(report, out / "report.json")
    return report
