"""Running the X-ray cascade over many image files (:func:`run_cascade`: per image ``<id>.json`` and
``<id>_gradcam.png``, and ``summary.csv``; a bad file is recorded with its reason and the run goes on), and
scoring it on labelled images (:func:`evaluate_cascade`, 4 classes)."""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctcovid.io.atomic import write_csv_atomic, write_json_atomic
from ctcovid.io.errors import CTInputError

from .cascade import CXRCascade
from .result import FINAL_LABELS, SUMMARY_FIELDS, SUMMARY_NAME, CXRResult

__all__ = ["CascadeRunReport", "cascade_scores", "evaluate_cascade", "run_cascade"]

logger = logging.getLogger(__name__)


@dataclass
class CascadeRunReport:
    """What :func:`run_cascade` did: one summary row per input, in input order."""

    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r["status"] == "failed")

    @property
    def ok(self) -> int:
        return sum(1 for r in self.rows if r["status"] == "ok")

    @property
    def summary_path(self) -> Path:
        return self.out_dir / SUMMARY_NAME


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
) -> CascadeRunReport:
    """Run the cascade over image files, writing ``<id>.json``, ``<id>_gradcam.png`` and ``summary.csv``.

    A file that cannot be read (any :class:`~ctcovid.io.errors.CTInputError`) or that fails in the networks
    gets ``status = "failed"`` and the reason, in its JSON and its summary row; the run goes on.
    ``summary.csv`` is rewritten (atomically) after every image.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in images]
    report = CascadeRunReport(out)
    for i, (path, image_id) in enumerate(zip(paths, _unique_ids(paths))):
        overlay = out / f"{image_id}_gradcam.png" if gradcam else None
        try:
            result = cascade.predict(path, overlay_path=overlay)
        except CTInputError as e:
            result = CXRResult(image=str(path), status="failed", reason=str(e), models=cascade.models())
        except Exception as e:  # a network/transform failure on one image must not end the run
            logger.error("cascade failed on %s:\n%s", path, traceback.format_exc())
            result = CXRResult(image=str(path), status="failed", reason=f"{type(e).__name__}: {e}",
                               models=cascade.models())
        if result.overlay_png:
            result.overlay_png = Path(result.overlay_png).name
        record = {"id": image_id, **result.to_dict(), "warnings": list(cascade.warnings)}
        write_json_atomic(record, out / f"{image_id}.json")
        report.rows.append(result.summary_row(image_id))
        write_csv_atomic(report.rows, SUMMARY_FIELDS, report.summary_path)
        if progress is not None:
            progress(i + 1, len(paths), report.rows[-1])
    if not paths:
        write_csv_atomic([], SUMMARY_FIELDS, report.summary_path)
    return report


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
