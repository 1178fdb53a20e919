"""Classification report for scan- or image-level classifiers (CT detection / severity, X-ray stages).

scikit-learn does the arithmetic; this module only collects one-vs-rest and overall numbers into one
JSON-serialisable dictionary, so every bundle's ``evaluate.json`` writes the same report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

__all__ = ["classification_report", "probabilities_and_labels"]

_PER_CLASS_KEYS = ("sensitivity", "specificity", "precision", "f1", "accuracy", "auc")


def _ratio(num: float, den: float) -> float | None:
    """``num / den``; ``None`` when the denominator is 0 (the quantity is undefined for this data)."""
    return float(num / den) if den > 0 else None


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def probabilities_and_labels(
    y_true: Sequence[int] | np.ndarray, y_prob: Sequence[Sequence[float]] | np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to ``(y_true (N,) int64, y_prob (N, C) float64)``.

    ``y_true`` may also be one-hot ``(N, C)``. Raises ``ValueError`` on inconsistent shapes or labels.
    """
    t = np.asarray(y_true)
    p = np.asarray(y_prob, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != num_classes:
        raise ValueError(f"y_prob must have shape (N, {num_classes}), got {p.shape}")
    if t.ndim == 2:
        if t.shape != p.shape:
            raise ValueError(f"one-hot y_true shape {t.shape} does not match y_prob {p.shape}")
        t = t.argmax(axis=1)
    t = t.reshape(-1)
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"{t.shape[0]} labels but {p.shape[0]} probability rows")
    if t.shape[0] == 0:
        raise ValueError("empty evaluation set: no labels")
    if not np.all(np.equal(np.mod(t, 1), 0)):
        raise ValueError("y_true must hold integer class indices")
    t = t.astype(np.int64)
    if t.min() < 0 or t.max() >= num_classes:
        raise ValueError(f"class indices must lie in [0, {num_classes - 1}], got {sorted(set(t.tolist()))}")
    if not np.all(np.isfinite(p)):
        raise ValueError("y_prob holds NaN or infinite values")
    return t, p


def classification_report(
    y_true: Sequence[int] | np.ndarray,
    y_prob: Sequence[Sequence[float]] | np.ndarray,
    class_names: Sequence[str],
) -> dict:
    """One-vs-rest and overall metrics of a single-label classifier.

    Args:
        y_true: ``(N,)`` integer class indices (or ``(N, C)`` one-hot).
        y_prob: ``(N, C)`` class probabilities (or any scores; the prediction is their arg-max and the
            AUC ranks them).
        class_names: ``C`` names, in class-index order.

    Returns:
        a JSON-serialisable dict::

            {"num_samples": N, "class_names": [...],
             "accuracy": overall accuracy, "macro_f1": sklearn f1_score(average="macro"),
             "confusion_matrix": C x C list, rows = true class, columns = predicted class,
             "per_class": {name: {"support", "sensitivity", "specificity", "precision", "f1",
                                   "accuracy", "auc"}},
             "macro": {the per-class keys averaged over classes}}

        Per class, the class is "positive" and all others "negative" (one-vs-rest); ``accuracy`` there is
        (TP + TN) / N. Undefined values are ``None``: sensitivity without positives, precision without
        positive predictions, specificity without negatives, AUC when the class or its complement is
        absent. Macro averages are over the classes where the value is defined, except ``macro["f1"]``,
        which equals ``macro_f1`` (scikit-learn's convention: an undefined F1 counts as 0 and every class
        counts, present or not).
    """
    names = [str(n) for n in class_names]
    num_classes = len(names)
    if num_classes < 2:
        raise ValueError("a classification report needs at least 2 classes")
    t, p = probabilities_and_labels(y_true, y_prob, num_classes)
    pred = p.argmax(axis=1)
    labels = list(range(num_classes))
    cm = confusion_matrix(t, pred, labels=labels)
    f1_per_class = f1_score(t, pred, labels=labels, average=None, zero_division=0)
    n = int(t.shape[0])

    per_class: dict[str, dict] = {}
    for c, name in enumerate(names):
        tp = int(cm[c, c])
        fn = int(cm[c, :].sum()) - tp
        fp = int(cm[:, c].sum()) - tp
        tn = n - tp - fn - fp
        positives = t == c
        auc = None
        if 0 < positives.sum() < n:
            auc = float(roc_auc_score(positives.astype(np.int64), p[:, c]))
        per_class[name] = {
            "support": tp + fn,
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "f1": float(f1_per_class[c]),
            "accuracy": _ratio(tp + tn, n),
            "auc": auc,
        }

    macro_f1 = float(f1_score(t, pred, labels=labels, average="macro", zero_division=0))
    macro = {k: _mean_defined([per_class[name][k] for name in names]) for k in _PER_CLASS_KEYS}
    macro["f1"] = macro_f1
    return {
        "num_samples": n,
        "class_names": names,
        "accuracy": float(accuracy_score(t, pred)),
        "macro_f1": macro_f1,
        "confusion_matrix": cm.astype(int).tolist(),
        "per_class": per_class,
        "macro": macro,
    }
