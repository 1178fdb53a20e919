"""95 % confidence intervals for the small held-out sets the X-ray reports quote.

- :func:`proportion_ci`: Wilson score interval of a sensitivity / specificity (scipy's ``binomtest``).
- :func:`auc_ci_by_patient`: percentile bootstrap of the ROC AUC that resamples *patients*, not images, because
  several ieee8023 patients contribute several films and those are not independent (scikit-learn's
  ``roc_auc_score`` does the AUC; the cluster resampling is the few lines no library packages).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["proportion_ci", "auc_ci_by_patient"]


def proportion_ci(k: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Wilson interval ``[low, high]`` of ``k`` successes in ``n`` trials (rounded to 4 places); None if n == 0."""
    if n == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def auc_ci_by_patient(
    y_true: Sequence[int] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    patients: Sequence[str],
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[float] | None:
    """Percentile interval of the ROC AUC of ``score`` for the binary ``y_true``, patients resampled with
    replacement (each drawn patient brings all its images). Resamples holding one class only are redrawn as
    skipped; None when the input has one class or fewer than 2 patients."""
    from sklearn.metrics import roc_auc_score

    y, s = np.asarray(y_true, dtype=int), np.asarray(score, dtype=float)
    if len(set(y.tolist())) < 2:
        return None
    ids = sorted(set(patients))
    if len(ids) < 2:
        return None
    index = {p: i for i, p in enumerate(ids)}
    members = [[] for _ in ids]
    for j, p in enumerate(patients):
        members[index[p]].append(j)
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])
        if len(set(y[rows].tolist())) == 2:
            aucs.append(roc_auc_score(y[rows], s[rows]))
    if not aucs:
        return None
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(aucs, [tail, 100 - tail])
    return [round(float(low), 4), round(float(high), 4)]
