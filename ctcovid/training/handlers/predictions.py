"""Per-scan prediction CSV for classification inference, with skipped bad scans recorded in the same file.

MONAI's ``ClassificationSaver`` writes ``filename,p0,p1,...`` with no header, keyed by file name, and cannot
hold a row for a scan that failed to load; the bundles' users need class-named columns and one row per
scan, skipped ones included with their error. Hence this handler and the iteration function that takes
the skip records off the batch (see :mod:`ctcovid.training.dataset`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from ignite.engine import Engine

from ctcovid.io.atomic import write_csv_atomic
from ctcovid.training.dataset import SKIPPED_KEY
from ctcovid.training.handlers.epoch_file import EpochFileWriter

__all__ = ["ClassificationCSVWriter", "skip_failed_scans_iteration"]

logger = logging.getLogger(__name__)


def _skipped_list(engine: Engine) -> list[dict]:
    records = getattr(engine.state, "skipped_scans", None)
    if records is None:
        records = []
        engine.state.skipped_scans = records
    return records


def skip_failed_scans_iteration(engine: Engine, batchdata: dict):
    """``iteration_update`` for a MONAI evaluator fed by ``ScanDataset(on_error="skip")``.

    Moves the batch's failure records to ``engine.state.skipped_scans`` (logging each one), then runs the
    evaluator's normal iteration on the remaining scans; a batch where every scan failed produces no output.
    """
    skipped = batchdata.pop(SKIPPED_KEY, []) if isinstance(batchdata, dict) else []
    records = _skipped_list(engine)
    for rec in skipped:
        engine.logger.warning("skipped scan %s: %s", rec.get("name"), rec.get("error"))
        records.append(rec)
    if not isinstance(batchdata, dict) or "image" not in batchdata:
        engine.state.batch = []
        return []
    return engine._iteration(engine, batchdata)


def _filename(item: dict, image_key: str) -> str:
    img = item.get(image_key)
    meta = getattr(img, "meta", None)
    if isinstance(meta, dict) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return ""


class ClassificationCSVWriter(EpochFileWriter):
    """Writes ``<output_dir>/<filename>``: one row per scan with class probabilities, or why it was skipped.

    Columns: ``name, image, status ("ok" | "skipped"), predicted_class, prob_<class> ..., error``.
    Rows keep the order in which scans were processed; the file is written atomically at the end of the
    epoch (run). Expects a MONAI evaluator with ``decollate=True`` (the default): ``engine.state.batch``
    and ``engine.state.output`` are lists of per-scan dicts.

    Args:
        output_dir: folder of the CSV (created if needed).
        class_names: class order of the ``pred`` vector.
        filename: CSV file name.
        pred_key: output key of the ``(C,)`` probability vector.
        name_key: batch key of the scan name (``ctcovid.training.find_scans`` sets ``name``).
        image_key: batch key of the image MetaTensor (its ``filename_or_obj`` goes to the ``image`` column).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        filename: str = "predictions.csv",
        pred_key: str = "pred",
        name_key: str = "name",
        image_key: str = "image",
    ) -> None:
        super().__init__(output_dir, class_names, filename)
        self.pred_key = pred_key
        self.name_key = name_key
        self.image_key = image_key
        self.rows: list[dict] = []
        self._skipped_seen = 0

    def _started(self, engine: Engine) -> None:
        self.rows = []
        self._skipped_seen = 0
        engine.state.skipped_scans = []

    def _collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if not isinstance(batch, list) or not isinstance(output, list):
            raise TypeError(
                "ClassificationCSVWriter needs a decollated batch and output (evaluator decollate=True)"
            )
        for item, out in zip(batch, output):
            prob = out[self.pred_key]
            prob = (
                prob.detach().float().cpu().reshape(-1)
                if isinstance(prob, torch.Tensor)
                else torch.tensor(prob)
            )
            if prob.numel() != len(self.class_names):
                raise ValueError(f"pred has {prob.numel()} values but {len(self.class_names)} class names")
            row = {
                "name": item.get(self.name_key, ""),
                "image": _filename(item, self.image_key),
                "status": "ok",
                "predicted_class": self.class_names[int(prob.argmax())],
                "error": "",
            }
            row.update({f"prob_{c}": f"{float(p):.6f}" for c, p in zip(self.class_names, prob)})
            self.rows.append(row)
        skipped = _skipped_list(engine)
        for rec in skipped[self._skipped_seen :]:
            self.rows.append(
                {
                    "name": rec.get("name", ""),
                    "image": rec.get("image", ""),
                    "status": "skipped",
                    "predicted_class": "",
                    "error": f"{rec.get('error_type', '')}: {rec.get('error', '')}",
                }
            )
        self._skipped_seen = len(skipped)

    def _write(self, engine: Engine) -> None:
        fields = (
            ["name", "image", "status", "predicted_class"]
            + [f"prob_{c}" for c in self.class_names]
            + ["error"]
        )
        write_csv_atomic(self.rows, fields, self.path)
        n_skip = sum(r["status"] == "skipped" for r in self.rows)
        engine.logger.info(
            "wrote %d predictions (%d scans skipped) to %s", len(self.rows) - n_skip, n_skip, self.path
        )
