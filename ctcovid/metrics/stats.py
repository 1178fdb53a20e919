"""Statistical comparison of two models' outputs: the F-test of equal variances.

The Cascade-SEME evaluation compares two models with an F-test on their output distributions. This module
makes what is compared explicit:

- :func:`f_test` takes two samples ``a`` and ``b`` and tests H0: ``var(a) == var(b)`` with
  ``F = var(a) / var(b)`` (unbiased sample variances, ``ddof=1``), ``F ~ F(len(a) - 1, len(b) - 1)`` under
  H0 for independent normal samples, and a two-sided p-value ``2 * min(P(F' <= F), P(F' >= F))`` (capped
  at 1). It tests spread, not mean: two models with equal accuracy can differ here and vice versa.
- :func:`compare_models_f_test` builds the samples from two models' probabilities on the *same* test
  images: per image, the probability each model gives to the image's true class
  (``p_model[i, y_true[i]]``). A larger variance means the model is less consistent in how sure it is of
  the right answer. The two samples are paired (same images), which the classical F-test ignores; read the
  p-value as descriptive, not as an exact error rate.

scipy provides the F distribution; the statistic itself is two lines, so it is written here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["FTestResult", "f_test", "compare_models_f_test", "true_class_probabilities"]


@dataclass(frozen=True)
class FTestResult:
    """Result of :func:`f_test`: ``statistic = var_a / var_b`` with ``(dof_a, dof_b)`` degrees of freedom."""

    statistic: float
    p_value: float
    dof_a: int
    dof_b: int
    var_a: float
    var_b: float
    alternative: str
    compared: str = "sample variances"

    def to_dict(self) -> dict:
        return asdict(self)


def f_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    alternative: str = "two-sided",
    compared: str = "sample variances",
) -> FTestResult:
    """F-test of equal variances of two independent samples.

    Args:
        a: first sample (any shape; flattened), at least 2 finite values.
        b: second sample, at least 2 finite values.
        alternative: ``"two-sided"`` (H1: var(a) != var(b)), ``"greater"`` (var(a) > var(b)) or ``"less"``.
        compared: free text stored in the result, saying what the samples are.

    Returns:
        :class:`FTestResult`. Raises ``ValueError`` for too small, non-finite or constant ``b`` samples.
    """
    from scipy import stats

    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.size < 2 or y.size < 2:
        raise ValueError(f"F-test needs at least 2 values per sample, got {x.size} and {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("F-test samples hold NaN or infinite values")
    var_a, var_b = float(x.var(ddof=1)), float(y.var(ddof=1))
    if var_b == 0.0:
        raise ValueError("F-test undefined: the second sample has zero variance")
    f = var_a / var_b
    dof_a, dof_b = x.size - 1, y.size - 1
    cdf = float(stats.f.cdf(f, dof_a, dof_b))
    sf = float(stats.f.sf(f, dof_a, dof_b))
    if alternative == "two-sided":
        p = min(1.0, 2.0 * min(cdf, sf))
    elif alternative == "greater":
        p = sf
    elif alternative == "less":
        p = cdf
    else:
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    return FTestResult(f, p, dof_a, dof_b, var_a, var_b, alternative, compared)


def true_class_probabilities(y_true: Sequence[int] | np.ndarray, y_prob: Sequence | np.ndarray) -> np.ndarray:
    """``(N,)`` probability given to each image's true class: ``y_prob[i, y_true[i]]``."""
    t = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(y_prob, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != t.shape[0]:
        raise ValueError(f"y_prob shape {p.shape} does not match {t.shape[0]} labels")
    return p[np.arange(t.shape[0]), t]


def compare_models_f_test(
    y_true: Sequence[int] | np.ndarray,
    prob_a: Sequence | np.ndarray,
    prob_b: Sequence | np.ndarray,
    alternative: str = "two-sided",
) -> FTestResult:
    """F-test between two models evaluated on the same images (see the module docstring for what it compares).

    Args:
        y_true: ``(N,)`` true class indices.
        prob_a: ``(N, C)`` probabilities of model A.
        prob_b: ``(N, C)`` probabilities of model B.
        alternative: as in :func:`f_test`.
    """
    return f_test(
        true_class_probabilities(y_true, prob_a),
        true_class_probabilities(y_true, prob_b),
        alternative=alternative,
        compared="per-image probability of the true class, model A vs model B (same images)",
    )
