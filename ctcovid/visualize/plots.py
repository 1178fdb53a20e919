"""Evaluation figures: confusion matrix and one-vs-rest ROC curves, written as PNG files.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot global state, no display
needed, safe in worker threads) and written atomically: the PNG goes to a temporary file in the target
folder, then ``os.replace`` moves it into place, so a reader never sees half a file. The ROC points come
from :func:`sklearn.metrics.roc_curve`; matplotlib only draws.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["save_confusion_matrix_png", "save_roc_png", "write_figure_png_atomic"]


def _new_figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def write_figure_png_atomic(fig, path: str | os.PathLike) -> Path:
    """Render ``fig`` to PNG at ``path`` through a temporary file in the same folder; returns the path."""
    from ctcovid.io.atomic import write_bytes_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return write_bytes_atomic(buf.getvalue(), path)


def save_confusion_matrix_png(
    cm: Sequence[Sequence[int]] | np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "Confusion matrix",
    normalize: bool = False,
) -> Path:
    """Draw a confusion matrix (rows = true class, columns = predicted class) as a PNG.

    Args:
        cm: ``(C, C)`` counts, as in :func:`sklearn.metrics.confusion_matrix`.
        class_names: ``C`` labels for the axes.
        path: output PNG.
        title: figure title.
        normalize: colour and annotate by row fraction (recall per true class) instead of counts; the
            count stays in brackets.
    """
    cm = np.asarray(cm)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {n} class names")
    rows = cm.sum(axis=1, keepdims=True).astype(np.float64)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    shown = frac if normalize else cm
    fig = _new_figure((1.6 + 1.1 * n, 1.2 + 1.0 * n))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1.0 if normalize else max(int(cm.max()), 1))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=list(class_names), rotation=30, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = (1.0 if normalize else max(int(cm.max()), 1)) / 2
    for i in range(n):
        for j in range(n):
            text = f"{frac[i, j]:.2f}\n({int(cm[i, j])})" if normalize else str(int(cm[i, j]))
            ax.text(j, i, text, ha="center", va="center", color="white" if shown[i, j] > threshold else "black")
    return write_figure_png_atomic(fig, path)


def save_roc_png(
    y_true: Sequence[int] | np.ndarray,
    y_prob: Sequence[Sequence[float]] | np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "ROC (one-vs-rest)",
) -> Path:
    """One ROC curve per class (that class positive, all others negative), AUC in the legend.

    Args:
        y_true: ``(N,)`` integer class indices.
        y_prob: ``(N, C)`` class probabilities (scores).
        class_names: ``C`` names.
        path: output PNG.
        title: figure title.

    A class with no positive or no negative sample has no ROC curve; it is listed as "undefined" in the
    legend rather than dropped silently.
    """
    from sklearn.metrics import auc, roc_curve

    t = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(y_prob, dtype=np.float64)
    if p.ndim != 2 or p.shape != (t.shape[0], len(class_names)):
        raise ValueError(f"y_prob shape {p.shape} does not match {t.shape[0]} labels x {len(class_names)} classes")
    fig = _new_figure((5.5, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for c, name in enumerate(class_names):
        positives = t == c
        if positives.all() or not positives.any():
            ax.plot([], [], label=f"{name} (undefined: one class only)")
            continue
        fpr, tpr, _ = roc_curve(positives.astype(np.int64), p[:, c])
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return write_figure_png_atomic(fig, path)
