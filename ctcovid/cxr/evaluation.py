"""Evaluation and viral-threshold calibration for the chest X-ray cascade bundles.

Two ignite handlers for MONAI evaluators (``SupervisedEvaluator``), used by the bundles' ``evaluate.json``
and ``calibrate.json``; both extend :class:`ctcovid.training.handlers.ClassificationReportWriter` (which collects the
post-processed per-image probabilities and labels of a run and writes the classification report) and then

- :class:`EvaluationReportWriter` adds the confusion matrix and ROC PNGs (:mod:`ctcovid.visualize.plots`)
  to the paper-style report (per-class one-vs-rest sensitivity, specificity, precision, F1, accuracy, AUC
  and their macro averages);
- :class:`ViralThresholdCalibrator` computes the cascade's viral threshold ``Th_Vir`` = the mean stage-1
  probability of the viral class over the calibration images and stores it, with the calibration set,
  the weights it was computed for and the date, in ``models/viral_threshold.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ctcovid.io.atomic import write_csv_atomic, write_json_atomic
from ctcovid.io.hashing import sha256_file
from ctcovid.training.handlers.report import ClassificationReportWriter

__all__ = [
    "EvaluationReportWriter",
    "compare_reports_f_test",
    "ViralThresholdCalibrator",
    "viral_threshold_from_probabilities",
    "write_viral_threshold",
    "read_viral_threshold",
    "write_training_info",
    "write_evaluation_report",
    "write_evaluation_figures",
    "ThresholdFileError",
]

THRESHOLD_FILE_NAME = "viral_threshold.json"


class ThresholdFileError(ValueError):
    """The stored viral threshold is missing or malformed (the message names the file)."""


def _report_arrays(report: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(labels (N,), probs (N, C))`` from the ``scans`` list of a :class:`ClassificationReportWriter` report."""
    names = list(report["class_names"])
    scans = report["scans"]
    labels = np.asarray([names.index(s["label"]) for s in scans], dtype=np.int64)
    probs = np.asarray([s["probabilities"] for s in scans], dtype=np.float64).reshape(len(scans), len(names))
    return labels, probs


class EvaluationReportWriter(ClassificationReportWriter):
    """The paper-style evaluation of an evaluator run: the report JSON of
    :class:`ctcovid.training.handlers.ClassificationReportWriter` (per-class one-vs-rest sensitivity, specificity,
    precision, F1, accuracy, AUC, macro averages, confusion matrix, per-image probabilities) plus
    ``class_balance``, ``confusion_matrix.png`` and ``roc.png`` in the same folder.

    Args:
        output_dir: output folder.
        class_names: class order of the predictions.
        title: figure title prefix (bundle and split).
        filename: report file name.
        kwargs: passed to :class:`~ctcovid.training.handlers.ClassificationReportWriter` (``output_transform``,
            ``name_transform``, ``extra``).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        title: str = "",
        filename: str = "report.json",
        **kwargs,
    ) -> None:
        super().__init__(output_dir, class_names, filename=filename, **kwargs)
        self.title = title

    def _write(self, engine) -> None:
        super()._write(engine)
        labels, probs = _report_arrays(self.report)
        self.report["class_balance"] = {c: int((labels == i).sum()) for i, c in enumerate(self.class_names)}
        self.report["figures"] = write_evaluation_figures(self.report, labels, probs, self.output_dir, self.title)
        write_json_atomic(self.report, self.path)


class ViralThresholdCalibrator(ClassificationReportWriter):
    """Compute and store the cascade's viral threshold ``Th_Vir`` at the end of an evaluator run.

    ``Th_Vir`` = mean over the calibration images of the stage-1 probability of class ``viral_index`` (the
    paper's mean viral probability). With ``only_class`` set, the mean runs over the images whose true class
    is ``only_class`` (e.g. only the viral ones) instead. The calibration set's own classification report is
    written next to the threshold (``calibration_report.json``), so the value can be audited.

    Args:
        output_file: threshold JSON (``models/viral_threshold.json`` of the stage-1 bundle).
        class_names: stage-1 class names.
        viral_index: index of the viral class.
        calibration_set: description of the images (datalist file and part) stored with the value.
        only_class: restrict the mean to images of this true class (``None``: all images).
        model_file: weights the probabilities came from; their SHA-256 is stored so that a threshold that no
            longer matches the weights can be detected.
        extra: more JSON facts stored with the value (image size, data root).
        kwargs: passed to :class:`~ctcovid.training.handlers.ClassificationReportWriter`.
    """

    def __init__(
        self,
        output_file: str | os.PathLike,
        class_names: Sequence[str] = ("normal", "bacterial", "viral"),
        viral_index: int = 2,
        calibration_set: str = "",
        only_class: int | None = None,
        model_file: str | os.PathLike | None = None,
        extra: dict | None = None,
        **kwargs,
    ) -> None:
        self.output_file = Path(output_file)
        super().__init__(self.output_file.parent, class_names, filename="calibration_report.json", **kwargs)
        self.viral_index = int(viral_index)
        self.calibration_set = calibration_set
        self.only_class = only_class
        self.model_file = model_file
        self.threshold_extra = dict(extra or {})
        self.record: dict | None = None

    def _write(self, engine) -> None:
        super()._write(engine)
        labels, probs = _report_arrays(self.report)
        value = viral_threshold_from_probabilities(probs, self.viral_index, labels, self.only_class)
        used = labels == self.only_class if self.only_class is not None else np.ones(len(labels), dtype=bool)
        self.record = write_viral_threshold(
            self.output_file,
            value,
            viral_index=self.viral_index,
            class_names=self.class_names,
            calibration_set=self.calibration_set,
            num_images=int(used.sum()),
            class_counts={c: int((labels[used] == i).sum()) for i, c in enumerate(self.class_names)},
            only_class=None if self.only_class is None else self.class_names[self.only_class],
            model_file=self.model_file,
            extra=self.threshold_extra,
        )
        engine.logger.info("viral threshold Th_Vir = %.6f (%d images) -> %s", value, int(used.sum()), self.output_file)


def compare_reports_f_test(report_a: str | os.PathLike | dict, report_b: str | os.PathLike | dict,
                           alternative: str = "two-sided") -> dict:
    """The optional F-test of the paper between two models evaluated on the same images.

    Args:
        report_a: ``report.json`` of model A (from an ``evaluate.json`` run), or its dict.
        report_b: the same for model B; it must list the same images (matched by name) with the same labels.
        alternative: as in :func:`ctcovid.metrics.stats.f_test`.

    Compares the two models' per-image probabilities of the true class (see
    :mod:`ctcovid.metrics.stats`); returns the :class:`~ctcovid.metrics.stats.FTestResult` as a dict plus the
    number of images and both models' accuracy.
    """
    from ctcovid.metrics.stats import compare_models_f_test

    reps = [r if isinstance(r, dict) else json.loads(Path(r).read_text(encoding="utf-8")) for r in (report_a, report_b)]
    if reps[0]["class_names"] != reps[1]["class_names"]:
        raise ValueError(f"the reports have different classes: {reps[0]['class_names']} vs {reps[1]['class_names']}")
    scans = [{s["name"]: s for s in r["scans"]} for r in reps]
    if set(scans[0]) != set(scans[1]) or len(scans[0]) != len(reps[0]["scans"]):
        raise ValueError("the reports do not list the same (uniquely named) images; compare runs on one test set")
    names = sorted(scans[0])
    if any(scans[0][n]["label"] != scans[1][n]["label"] for n in names):
        raise ValueError("the reports disagree on the true labels of some images")
    classes = list(reps[0]["class_names"])
    y = np.asarray([classes.index(scans[0][n]["label"]) for n in names])
    pa = np.asarray([scans[0][n]["probabilities"] for n in names], dtype=np.float64)
    pb = np.asarray([scans[1][n]["probabilities"] for n in names], dtype=np.float64)
    result = compare_models_f_test(y, pa, pb, alternative=alternative).to_dict()
    result.update(num_images=len(names), accuracy_a=reps[0]["accuracy"], accuracy_b=reps[1]["accuracy"])
    return result


def viral_threshold_from_probabilities(
    probs: np.ndarray | Sequence,
    viral_index: int = 2,
    labels: np.ndarray | Sequence | None = None,
    only_class: int | None = None,
) -> float:
    """``Th_Vir``: mean of ``probs[:, viral_index]`` (over rows with ``labels == only_class`` if given)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"calibration needs a non-empty (N, C) probability array, got shape {p.shape}")
    if not 0 <= viral_index < p.shape[1]:
        raise ValueError(f"viral_index {viral_index} outside the {p.shape[1]} classes")
    if only_class is not None:
        if labels is None:
            raise ValueError("only_class needs the labels")
        p = p[np.asarray(labels).reshape(-1) == only_class]
        if p.shape[0] == 0:
            raise ValueError(f"no calibration image of class {only_class}")
    return float(p[:, viral_index].mean())


def write_viral_threshold(
    path: str | os.PathLike,
    value: float,
    viral_index: int = 2,
    class_names: Sequence[str] = ("normal", "bacterial", "viral"),
    calibration_set: str = "",
    num_images: int | None = None,
    class_counts: dict | None = None,
    only_class: str | None = None,
    model_file: str | os.PathLike | None = None,
    extra: dict | None = None,
) -> dict:
    """Store ``Th_Vir`` and how it was obtained as JSON (atomic write); returns the record."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a probability threshold must lie in [0, 1], got {value}")
    over = f"the '{only_class}' calibration images" if only_class else "all calibration images"
    record = {
        "viral_threshold": float(value),
        "statistic": f"mean stage-1 probability of class '{class_names[viral_index]}' over {over}",
        "viral_index": int(viral_index),
        "class_names": list(class_names),
        "calibration_set": calibration_set,
        "num_images": num_images,
        "class_counts": class_counts,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if model_file is not None and Path(model_file).is_file():
        record["model_file"] = Path(model_file).name
        record["model_sha256"] = sha256_file(model_file)
    record.update(extra or {})
    write_json_atomic(record, path)
    return record


def write_training_info(path: str | os.PathLike, **facts) -> dict:
    """Store the facts of a training run next to its weights (``models/train_info.json``), with the date.

    The cascade reads ``spatial_size`` from it, so weights trained at a reduced size are run at that size.
    """
    record = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **facts}
    write_json_atomic(record, path)
    return record


def read_viral_threshold(path: str | os.PathLike) -> dict:
    """Read and check a stored threshold record; raises :class:`ThresholdFileError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ThresholdFileError(
            f"{path}: no stored viral threshold; run the stage-1 bundle's calibrate config "
            "(configs/calibrate.json) or `ctcovid cxr calibrate` after training"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        value = float(record["viral_threshold"])
    except (ValueError, KeyError, TypeError) as e:
        raise ThresholdFileError(f"{path}: not a viral-threshold record ({e})") from e
    if not 0.0 <= value <= 1.0:
        raise ThresholdFileError(f"{path}: viral_threshold {value} is not a probability")
    record["viral_threshold"] = value
    return record


def write_evaluation_figures(
    report: dict, labels: np.ndarray, probs: np.ndarray, output_dir: str | os.PathLike, title: str = ""
) -> list[str]:
    """Write ``confusion_matrix.png`` and ``roc.png`` for a report; returns their file names."""
    from ctcovid.visualize.plots import save_confusion_matrix_png, save_roc_png

    out = Path(output_dir)
    names = list(report["class_names"])
    prefix = f"{title}: " if title else ""
    save_confusion_matrix_png(report["confusion_matrix"], names, out / "confusion_matrix.png", f"{prefix}confusion matrix")
    save_roc_png(labels, probs, names, out / "roc.png", f"{prefix}ROC (one-vs-rest)")
    return ["confusion_matrix.png", "roc.png"]


def write_evaluation_report(
    y_true: np.ndarray | Sequence[int],
    y_prob: np.ndarray | Sequence,
    class_names: Sequence[str],
    output_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
    title: str = "",
    extra: dict | None = None,
) -> dict:
    """Outside an engine: write ``report.json``, ``predictions.csv``, ``confusion_matrix.png``, ``roc.png``.

    The report is :func:`ctcovid.metrics.classification.classification_report` plus ``class_balance``,
    ``files`` and ``extra``; returns it.
    """
    from ctcovid.metrics.classification import classification_report

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(y_prob, dtype=np.float64)
    report = classification_report(t, p, class_names)
    report["class_balance"] = {c: int((t == i).sum()) for i, c in enumerate(class_names)}
    report["figures"] = write_evaluation_figures(report, t, p, out, title)
    _write_predictions_csv(out / "predictions.csv", t, p, class_names, names)
    report.update(extra or {})
    write_json_atomic(report, out / "report.json")
    return report


def _write_predictions_csv(path: Path, t: np.ndarray, p: np.ndarray, class_names: Sequence[str], names) -> None:
    names = list(names) if names is not None else [""] * len(t)
    fields = ["image", "true", "predicted", *[f"p_{c}" for c in class_names]]
    rows = [
        {"image": n, "true": class_names[ti], "predicted": class_names[int(pi.argmax())],
         **{f"p_{c}": f"{v:.6f}" for c, v in zip(class_names, pi)}}
        for n, ti, pi in zip(names, t, p)
    ]
    write_csv_atomic(rows, fields, path)
