"""Keep "best so far" across a resumed training.

MONAI's ``CheckpointSaver(save_key_metric=True)`` remembers the best validation score in memory only, so a
resumed run overwrote ``model.pt`` at its first validation even when that score was worse. MONAI's own
remedy (``key_metric_save_state=True``) stores the tracker inside ``model.pt``, which then stops being a
plain state dict. :class:`BestMetricState` instead exposes the tracker as a state-dict object, so it goes
into the per-epoch "latest" checkpoint next to model, optimizer and trainer, and ``CheckpointLoader``
restores it on ``resume``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from monai.handlers import CheckpointSaver

__all__ = ["BestMetricState", "init_from_weights"]


class BestMetricState:
    """State-dict view of a key-metric ``CheckpointSaver``'s best-score tracking.

    Args:
        saver: a ``CheckpointSaver`` built with ``save_key_metric=True``.

    ``state_dict()`` -> ``{"_saved": [(score, filename), ...]}`` (ignite ``Checkpoint`` format);
    ``load_state_dict(sd)`` puts it back, so the next validation saves only if it beats ``score``.
    """

    def __init__(self, saver: CheckpointSaver) -> None:
        tracker = getattr(saver, "_key_metric_checkpoint", None)
        if tracker is None:
            raise ValueError("BestMetricState needs a CheckpointSaver with save_key_metric=True")
        self.tracker = tracker

    def state_dict(self) -> dict:
        return dict(self.tracker.state_dict())

    def load_state_dict(self, state_dict: Mapping) -> None:
        self.tracker.load_state_dict(state_dict)


def init_from_weights(network, path: str | os.PathLike) -> str:
    """Load a bundle's ``models/model.pt`` into ``network`` before fine-tuning; returns the file's sha256.

    Accepts what the bundles ship (plain state dicts, possibly stored in fp16/bf16, upcast to the network's
    dtype). Raises ``FileNotFoundError`` naming the file when it is missing (fine-tuning from nothing would
    silently train from scratch).
    """
    from ctcovid.bundle.loading import read_state_dict, weights_hash

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights to fine-tune from not found")
    network.load_state_dict(read_state_dict(path), strict=True)
    return weights_hash(path)
