"""Checkpoint look-ups for the bundle configs: refuse to run untrained weights, find the resume point."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ctcovid.bundle.errors import MissingWeightsError

__all__ = ["MissingWeightsError", "latest_checkpoint", "require_checkpoint"]

logger = logging.getLogger(__name__)

_EPOCH = re.compile(r"epoch=(\d+)\.pt$")


def require_checkpoint(path: str | os.PathLike, bundle_name: str, allow_random_weights: bool = False) -> bool:
    """True if the checkpoint ``path`` exists; otherwise raise, or (explicit opt-in) warn and return False.

    Used as ``"_disabled_": "$not ctcovid.training.handlers.require_checkpoint(...)"`` on the ``CheckpointLoader`` of
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
