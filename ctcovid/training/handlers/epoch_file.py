"""Base of the handlers that collect an evaluation's outputs over an epoch and write one file at its end."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ignite.engine import Engine, Events

__all__ = ["EpochFileWriter"]


class EpochFileWriter:
    """Attach to an ignite/MONAI engine: ``_started`` at each epoch start, ``_collect`` after each iteration,
    ``_write`` at each epoch end; the file is ``output_dir / filename`` (:attr:`path`).

    Args:
        output_dir: folder of the file.
        class_names: class order of the network's outputs.
        filename: the file's name.
    """

    def __init__(self, output_dir: str | os.PathLike, class_names: Sequence[str], filename: str) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = [str(c) for c in class_names]
        self.filename = filename

    @property
    def path(self) -> Path:
        return self.output_dir / self.filename

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _started(self, engine: Engine) -> None:
        raise NotImplementedError

    def _collect(self, engine: Engine) -> None:
        raise NotImplementedError

    def _write(self, engine: Engine) -> None:
        raise NotImplementedError
