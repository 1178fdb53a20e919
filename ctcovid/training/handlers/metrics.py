"""Validation metric for model selection: macro-averaged F1 over classes (scikit-learn does the math).

MONAI's ``ConfusionMatrix`` handler with ``metric_name="f1 score"`` reduces the confusion counts over
classes *before* computing F1 (``reduction="mean"``), which gives micro-F1 (= accuracy for single-label
data), or a per-class vector (``"mean_batch"``) that ``CheckpointSaver`` cannot rank. The COV19D challenge
ranks by macro-F1, so this small ignite ``EpochMetric`` calls ``sklearn.metrics.f1_score(average="macro")``
on the whole epoch (ignite gathers predictions across ranks under DDP).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from ignite.metrics import EpochMetric
from sklearn.metrics import f1_score

__all__ = ["MacroF1", "macro_f1_score"]


def _to_indices(t: torch.Tensor) -> torch.Tensor:
    """(N, C) scores / one-hot -> (N,) class indices; (N,) or (N, 1) stays as indices."""
    if t.ndim == 2 and t.shape[1] > 1:
        return t.argmax(dim=1)
    return t.reshape(-1).long()


def macro_f1_score(y_pred: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> float:
    """Macro F1 of ``y_pred`` (N, C) probabilities (or (N,) indices) against ``y`` (N,) indices or (N, C) one-hot.

    With ``num_classes`` every class counts, present in the data or not (an absent, never-predicted class
    scores 0, scikit-learn's ``zero_division=0``); otherwise the classes seen in either array count.
    """
    if num_classes is None and y_pred.ndim == 2 and y_pred.shape[1] > 1:
        num_classes = int(y_pred.shape[1])
    pred = _to_indices(y_pred).cpu().numpy()
    true = _to_indices(y).cpu().numpy()
    labels = list(range(num_classes)) if num_classes is not None else None
    return float(f1_score(true, pred, labels=labels, average="macro", zero_division=0))


class MacroF1(EpochMetric):
    """Ignite metric: macro-F1 of an epoch's predictions.

    Args:
        num_classes: classes that count in the average (default: ``y_pred``'s second dimension).
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``; with MONAI engines
            ``monai.handlers.from_engine(["pred", "label"])``. ``y_pred``: (B, C) probabilities or logits
            (arg-max is taken); ``y``: (B,) class indices or (B, C) one-hot.
        device: where the epoch's predictions are stored.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        self.num_classes = num_classes
        super().__init__(
            lambda p, t: macro_f1_score(p, t, num_classes),
            output_transform=output_transform,
            check_compute_fn=False,
            device=device,
        )
