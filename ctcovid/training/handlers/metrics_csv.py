"""Per-epoch metrics history as CSV. MONAI's ``MetricsSaver`` rewrites ``metrics.csv`` with only the latest
values each epoch; a training log needs one row per epoch (and survives a resume)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from ctcovid.io.atomic import write_csv_atomic

__all__ = ["MetricsCSVLogger"]


class MetricsCSVLogger:
    """Adds a row ``epoch, <scalar metrics of engine.state.metrics> ..., lr`` to a CSV at every epoch end.

    Attach it to the validator (its epoch is the trainer's, set by ``ValidationHandler``) or to a trainer.
    The file is rewritten atomically each time.

    Args:
        output_dir: folder of the CSV.
        filename: CSV file name.
        optimizer: if given, the first parameter group's learning rate is logged as ``lr``.
        overwrite: True starts a new file at the first write of this run; False appends to an existing
            file (resumed training).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        filename: str = "metrics.csv",
        optimizer: torch.optim.Optimizer | None = None,
        overwrite: bool = True,
    ) -> None:
        self.path = Path(output_dir) / filename
        self.optimizer = optimizer
        self.overwrite = overwrite
        self.rows: list[dict] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.rows is None:
            self.rows = []
            if not self.overwrite and self.path.is_file():
                with open(self.path, newline="", encoding="utf-8") as f:
                    self.rows = list(csv.DictReader(f))
        row: dict = {"epoch": engine.state.epoch}
        for k, v in engine.state.metrics.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float)):
                row[k] = v
        if self.optimizer is not None:
            row["lr"] = self.optimizer.param_groups[0]["lr"]
        self.rows.append(row)
        fields: list[str] = []
        for r in self.rows:
            fields.extend(k for k in r if k not in fields)
        write_csv_atomic(self.rows, fields, self.path)
