"""Evaluation report handler: collects an epoch's probabilities and labels and writes the classification
report (:func:`ctcovid.metrics.classification_report`) as JSON. MONAI's ``MetricsSaver`` saves metric
values, but there is no MONAI metric for the one-vs-rest table and confusion matrix the bundles report."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from ignite.engine import Engine
from monai.handlers import from_engine

from ctcovid.io.atomic import write_json_atomic
from ctcovid.metrics.classification import classification_report
from ctcovid.training.handlers.epoch_file import EpochFileWriter

__all__ = ["ClassificationReportWriter", "batch_names"]


def batch_names(batch) -> list[str]:
    """Per-item names of a decollated batch: ``name`` if present, else the image's ``filename_or_obj``."""
    items = batch if isinstance(batch, list) else []
    names = []
    for i, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else None
        if name is None and isinstance(item, dict):
            meta = getattr(item.get("image"), "meta", None)
            name = meta.get("filename_or_obj") if isinstance(meta, dict) else None
        names.append(str(name) if name is not None else str(i))
    return names


class ClassificationReportWriter(EpochFileWriter):
    """Writes ``<output_dir>/<filename>`` at the end of an evaluator run (single process).

    Args:
        output_dir: output folder.
        class_names: class order of the predictions.
        filename: report file name.
        output_transform: maps ``engine.state.output`` to ``(preds, labels)``: lists of ``(C,)`` probability
            tensors and of class indices (scalar or one-hot tensors), as ``from_engine(["pred", "label"])`` gives.
        name_transform: maps ``engine.state.batch`` to a list of scan names (listed with their predictions);
            default :func:`batch_names`: each item's ``name``, else its image's ``filename_or_obj``.
        extra: constant entries added to the report (e.g. the checkpoint evaluated).

    The report is :func:`~ctcovid.metrics.classification_report`'s dict plus ``"scans"``: per scan its
    name, true label and probabilities.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        filename: str = "classification_report.json",
        output_transform: Callable = from_engine(["pred", "label"]),
        name_transform: Callable | None = None,
        extra: dict | None = None,
    ) -> None:
        super().__init__(output_dir, class_names, filename)
        self.output_transform = output_transform
        self.name_transform = name_transform
        self.extra = dict(extra or {})
        self.report: dict | None = None
        self._probs: list[torch.Tensor] = []
        self._labels: list[int] = []
        self._names: list[str] = []

    def _started(self, _engine: Engine) -> None:
        self._probs, self._labels, self._names = [], [], []

    def _collect(self, engine: Engine) -> None:
        preds, labels = self.output_transform(engine.state.output)
        for p, t in zip(preds, labels):
            t = torch.as_tensor(t)
            self._probs.append(torch.as_tensor(p).detach().float().cpu().reshape(-1))
            self._labels.append(int(t.argmax()) if t.numel() > 1 else int(t.reshape(-1)[0]))
        names = (self.name_transform or batch_names)(engine.state.batch)
        names = names[0] if isinstance(names, tuple) else names
        self._names.extend(str(n) for n in names)

    def _write(self, engine: Engine) -> None:
        probs = torch.stack(self._probs).numpy()
        report = classification_report(self._labels, probs, self.class_names)
        names = (
            self._names
            if len(self._names) == len(self._labels)
            else [str(i) for i in range(len(self._labels))]
        )
        report["scans"] = [
            {"name": n, "label": self.class_names[t], "probabilities": [round(float(x), 6) for x in p]}
            for n, t, p in zip(names, self._labels, probs)
        ]
        report.update(self.extra)
        self.report = report
        write_json_atomic(report, self.path)
        engine.logger.info(
            "classification report (%d scans): macro-F1 %.4f, accuracy %.4f -> %s",
            report["num_samples"],
            report["macro_f1"],
            report["accuracy"],
            self.path,
        )
