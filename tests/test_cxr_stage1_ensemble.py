"""benchmarks/cxr_stage1_ensemble.py: combinations of members and their scores, on hand-made probabilities."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ctcovid.bundle import bundles_root

sys.path.insert(0, str(bundles_root().parent / "benchmarks"))
from cxr_stage1_ensemble import combinations, main, scores  # noqa: E402

LABELS = np.array([0, 1, 2, 1])


def test_every_combination_is_the_mean_of_its_members():
    probs = {n: np.random.default_rng(i).dirichlet(np.ones(3), size=4) for i, n in enumerate("abc")}
    combos = combinations(probs)
    assert sorted(combos) == ["a", "a+b", "a+b+c", "a+c", "b", "b+c", "c"]
    np.testing.assert_allclose(combos["a+c"], (probs["a"] + probs["c"]) / 2)
    np.testing.assert_allclose(combos["a+b+c"], (probs["a"] + probs["b"] + probs["c"]) / 3)
    np.testing.assert_array_equal(combos["b"], probs["b"])


def test_two_members_wrong_on_different_films_are_right_together():
    # a is wrong on film 3, b on film 0, each less sure there than the other member is right
    a = np.array([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    b = np.array([[0.3, 0.1, 0.6], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]])
    combos = combinations({"a": a, "b": b})
    assert scores(LABELS, combos["a"])["accuracy"] == 0.75
    assert scores(LABELS, combos["b"])["accuracy"] == 0.75
    both = scores(LABELS, combos["a+b"])
    assert both["accuracy"] == 1.0 and both["macro_f1"] == 1.0 and both["macro_auc"] == 1.0


@pytest.mark.parametrize(
    "members",
    [["only=bundles"], ["bundles", "b=bundles"], ["a=bundles", "a=other", "b=bundles"], ["=bundles", "b=bundles"]],
    ids=["one member", "no name", "same name twice", "empty name"],
)
def test_bad_members_are_refused_by_name(members, capsys):
    with pytest.raises(SystemExit) as err:
        main([arg for m in members for arg in ("--member", m)])
    assert err.value.code == 2
    assert "--member" in capsys.readouterr().err
