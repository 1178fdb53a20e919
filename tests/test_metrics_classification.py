"""classification_report and the MacroF1 ignite metric against scikit-learn and hand-counted values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from ctcovid.metrics import classification_report
from ctcovid.training.handlers import MacroF1, macro_f1_score

# 8 scans, 3 classes. Predictions (arg-max): [0, 1, 1, 2, 2, 0, 2, 1]
Y_TRUE = [0, 0, 1, 1, 2, 2, 2, 1]
Y_PROB = [
    [0.7, 0.2, 0.1],
    [0.3, 0.6, 0.1],
    [0.1, 0.8, 0.1],
    [0.2, 0.3, 0.5],
    [0.1, 0.1, 0.8],
    [0.5, 0.2, 0.3],
    [0.2, 0.2, 0.6],
    [0.3, 0.4, 0.3],
]
NAMES = ["mild", "moderate", "severe"]


def test_report_hand_counted_three_classes():
    r = classification_report(Y_TRUE, Y_PROB, NAMES)
    # confusion matrix, rows = truth: class 0 -> [1 right, 1 as 1]; class 1 -> [0, 2, 1]; class 2 -> [1, 0, 2]
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert r["accuracy"] == pytest.approx(5 / 8)
    mild = r["per_class"]["mild"]
    # mild: TP 1, FN 1, FP 1 (a severe scan), TN 5
    assert mild["support"] == 2
    assert mild["sensitivity"] == pytest.approx(1 / 2)
    assert mild["specificity"] == pytest.approx(5 / 6)
    assert mild["precision"] == pytest.approx(1 / 2)
    assert mild["f1"] == pytest.approx(1 / 2)
    assert mild["accuracy"] == pytest.approx(6 / 8)
    moderate = r["per_class"]["moderate"]  # TP 2, FN 1, FP 1, TN 4
    assert moderate["sensitivity"] == pytest.approx(2 / 3)
    assert moderate["specificity"] == pytest.approx(4 / 5)
    assert moderate["f1"] == pytest.approx(2 / 3)


def test_report_matches_sklearn():
    r = classification_report(Y_TRUE, Y_PROB, NAMES)
    t, p = np.array(Y_TRUE), np.array(Y_PROB)
    pred = p.argmax(1)
    assert r["macro_f1"] == pytest.approx(f1_score(t, pred, average="macro"))
    assert r["macro"]["f1"] == pytest.approx(r["macro_f1"])
    assert r["accuracy"] == pytest.approx(accuracy_score(t, pred))
    assert r["confusion_matrix"] == confusion_matrix(t, pred).tolist()
    for c, name in enumerate(NAMES):
        assert r["per_class"][name]["auc"] == pytest.approx(roc_auc_score(t == c, p[:, c]))
        assert r["per_class"][name]["f1"] == pytest.approx(f1_score(t == c, pred == c))
    assert r["macro"]["auc"] == pytest.approx(roc_auc_score(t, p, multi_class="ovr", average="macro"))
    json.dumps(r, allow_nan=False)  # JSON-serialisable, no NaN


def test_binary_report_auc_and_onehot_labels():
    rng = np.random.default_rng(0)
    t = np.array([0, 0, 0, 1, 1, 1, 1, 0, 1, 0])
    s = np.clip(t * 0.3 + rng.uniform(0, 0.7, t.size), 0, 1)
    prob = np.stack([1 - s, s], axis=1)
    r = classification_report(np.eye(2)[t], prob, ["non-covid", "covid"])  # one-hot truth works too
    assert r["per_class"]["covid"]["auc"] == pytest.approx(roc_auc_score(t, s))
    # in the binary case both one-vs-rest AUCs are the same ranking
    assert r["per_class"]["non-covid"]["auc"] == pytest.approx(r["per_class"]["covid"]["auc"])
    assert r["per_class"]["covid"]["sensitivity"] == pytest.approx(r["per_class"]["non-covid"]["specificity"])


def test_absent_class_gives_none_not_nan():
    # 4 severity classes but only mild and moderate in the data (the MedSeg demo set has only mild)
    r = classification_report(
        [0, 0, 1], [[0.9, 0.1, 0, 0], [0.2, 0.1, 0.7, 0], [0.1, 0.8, 0.1, 0]], NAMES + ["critical"]
    )
    crit = r["per_class"]["critical"]
    assert crit["support"] == 0 and crit["sensitivity"] is None and crit["auc"] is None
    assert crit["precision"] is None and crit["f1"] == 0.0
    assert r["per_class"]["severe"]["precision"] == 0.0  # predicted once, wrongly
    assert r["macro_f1"] == pytest.approx(
        f1_score([0, 0, 1], [0, 2, 1], labels=[0, 1, 2, 3], average="macro", zero_division=0)
    )
    json.dumps(r, allow_nan=False)


def test_report_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        classification_report([0, 1], [[0.5, 0.5, 0.0]] * 2, ["a", "b"])
    with pytest.raises(ValueError, match="class indices"):
        classification_report([0, 2], [[0.5, 0.5]] * 2, ["a", "b"])
    with pytest.raises(ValueError, match="labels but"):
        classification_report([0, 1, 1], [[0.5, 0.5]] * 2, ["a", "b"])


def test_macro_f1_ignite_metric_matches_sklearn():
    """The validation key metric, fed per-scan tensors as MONAI's from_engine gives them."""
    from ignite.engine import Engine

    preds = [torch.tensor(p) for p in Y_PROB]
    labels = [torch.tensor(t) for t in Y_TRUE]
    engine = Engine(lambda e, batch: batch)  # the "output" of each iteration is the batch itself
    MacroF1(num_classes=3).attach(engine, "f1")
    # two iterations of decollated lists (pred list, label list), like a MONAI evaluator's output
    state = engine.run([(preds[:5], labels[:5]), (preds[5:], labels[5:])], max_epochs=1)
    expected = f1_score(Y_TRUE, np.array(Y_PROB).argmax(1), average="macro")
    assert state.metrics["f1"] == pytest.approx(expected)
    assert macro_f1_score(torch.tensor(Y_PROB), torch.tensor(Y_TRUE)) == pytest.approx(expected)


def test_monai_confusion_matrix_f1_is_not_macro_f1():
    """Why MacroF1 exists: MONAI's ConfusionMatrixMetric 'f1 score' with mean reduction is micro-F1."""
    from monai.metrics import ConfusionMatrixMetric

    t = torch.tensor(Y_TRUE)
    pred = torch.tensor(Y_PROB).argmax(1)
    m = ConfusionMatrixMetric(metric_name="f1 score", reduction="mean")
    m(torch.nn.functional.one_hot(pred, 3), torch.nn.functional.one_hot(t, 3))
    monai_f1 = float(m.aggregate()[0])
    assert monai_f1 == pytest.approx(f1_score(Y_TRUE, pred.numpy(), average="micro"))
    assert monai_f1 != pytest.approx(f1_score(Y_TRUE, pred.numpy(), average="macro"))
