"""Errors of bundle loading, shared by the bundle configs (through
:func:`ctcovid.training.handlers.require_checkpoint`), the CT pipeline and the X-ray cascade."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BundleError", "MissingWeightsError"]


class MissingWeightsError(FileNotFoundError):
    """A bundle was asked to predict but has no trained weights; the message says how to train it.

    One class for every place that refuses random weights (bundle configs through
    :func:`require_checkpoint`, the CT and X-ray pipelines), so ``except MissingWeightsError`` catches
    them all. ``bundle``, ``stage`` (a pipeline stage) and ``bundle_dir`` are set where known.
    """

    def __init__(
        self,
        message: str,
        *,
        bundle: str | None = None,
        stage: str | None = None,
        bundle_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(message)
        self.bundle, self.stage = bundle, stage
        self.bundle_dir = None if bundle_dir is None else Path(bundle_dir)


class BundleError(RuntimeError):
    """A bundle is missing, its config cannot build the network, or its checkpoint does not fit it."""
