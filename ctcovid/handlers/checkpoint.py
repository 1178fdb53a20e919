"""Checkpoint look-ups for the bundle configs: refuse to run untrained weights, find the resume point."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

__all__ = ["MissingWeightsError", "latest_checkpoint", "require_checkpoint"]

logger = logging.getLogger(__name__)

_EPOCH = re.compile(r"epoch=(\d+)\.pt$")


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


def require_checkpoint(path: str | os.PathLike, bundle_name: str, allow_random_weights: bool = False) -> bool:
    """True if the checkpoint ``path`` exists; otherwise raise, or (explicit opt-in) warn and return False.

    Used as ``"_disabled_": "$not ctcovid.handlers.require_checkpoint(...)"`` on the ``CheckpointLoader`` of
    an inference config, so that a bundle without trained weights never predicts with random ones silently.

    Raises:
        MissingWeightsError: no file at ``path`` and ``allow_random_weights`` is False; the message names the
            bundle and how to train it.
    """
    if Path(path).is_file():
        return True
    if allow_random_weights:
        logger.warning(
            "%s: no trained weights at %s; running with RANDOM weights because allow_random_weights is set "
            "-- the predictions mean nothing",
            bundle_name,
            path,
        )
        return False
    raise MissingWeightsError(
        f"bundle {bundle_name!r} has no trained weights at {path}. Train it first: python -m monai.bundle run "
        f"--config_file bundles/{bundle_name}/configs/train.json (bundles/{bundle_name}/docs/README.md says "
        "which data and settings it needs), or point --ckpt_path at a trained model.pt. For a smoke test "
        "only, --allow_random_weights true runs random weights.",
        bundle=bundle_name,
    )


def latest_checkpoint(
    ckpt_dir: str | os.PathLike, prefix: str = "checkpoint", required: bool = True
) -> str | None:
    """Path of the newest ``<prefix>*epoch=N.pt`` in ``ckpt_dir`` (highest N), as written by ``CheckpointSaver``.

    Returns None when there is none and ``required`` is False (bundle configs evaluate this expression
    even when resuming is off, so it must not fail then).

    Raises:
        FileNotFoundError: none exists and ``required`` (resume was asked for but there is nothing to resume).
    """
    best: tuple[int, str] | None = None
    folder = Path(ckpt_dir)
    if folder.is_dir():
        for f in folder.iterdir():
            m = _EPOCH.search(f.name)
            if f.is_file() and f.name.startswith(prefix) and m:
                if best is None or int(m.group(1)) > best[0]:
                    best = (int(m.group(1)), str(f))
    if best is None:
        if not required:
            return None
        raise FileNotFoundError(
            f"resume requested but no '{prefix}*epoch=N.pt' checkpoint in {ckpt_dir}; set resume to false to "
            "start a new training"
        )
    return best[1]
