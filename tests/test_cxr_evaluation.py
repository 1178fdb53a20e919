"""Paper-style evaluation of the X-ray cascade: metrics against scikit-learn, PNG figures, the F-test, and the
viral-threshold calibration (Th_Vir = mean viral probability), checked against hand computations."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

from ctcovid.cxr.evaluation import (
    EvaluationReportWriter,
    ThresholdFileError,
    ViralThresholdCalibrator,
    read_viral_threshold,
    viral_threshold_from_probabilities,
    write_evaluation_report,
    write_viral_threshold,
)
from ctcovid.metrics.stats import compare_models_f_test, f_test, true_class_probabilities
from ctcovid.visualize.plots import save_confusion_matrix_png, save_roc_png

CLASSES = ["normal", "bacterial", "viral"]
# Hand-made 3-class example: 9 images, some errors, scores with ties broken clearly.
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PROB = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.5, 0.4, 0.1],
        [0.2, 0.3, 0.5],  # normal called viral
        [0.1, 0.8, 0.1],
        [0.6, 0.3, 0.1],  # bacterial called normal
        [0.2, 0.5, 0.3],
        [0.1, 0.2, 0.7],
        [0.3, 0.3, 0.4],
        [0.1, 0.6, 0.3],  # viral called bacterial
    ]
)


def _png_ok(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_report_matches_sklearn_on_hand_made_example(tmp_path):
    report = write_evaluation_report(Y_TRUE, Y_PROB, CLASSES, tmp_path, names=[f"img{i}" for i in range(9)], title="t")
    pred = Y_PROB.argmax(1)
    cm = confusion_matrix(Y_TRUE, pred)
    assert report["confusion_matrix"] == cm.tolist()
    assert report["accuracy"] == pytest.approx(6 / 9)
    assert report["macro_f1"] == pytest.approx(f1_score(Y_TRUE, pred, average="macro"))
    sens = recall_score(Y_TRUE, pred, average=None)
    prec = precision_score(Y_TRUE, pred, average=None)
    f1 = f1_score(Y_TRUE, pred, average=None)
    for c, name in enumerate(CLASSES):
        pc = report["per_class"][name]
        tn = cm.sum() - cm[c, :].sum() - cm[:, c].sum() + cm[c, c]
        fp = cm[:, c].sum() - cm[c, c]
        assert pc["sensitivity"] == pytest.approx(sens[c])
        assert pc["precision"] == pytest.approx(prec[c])
        assert pc["f1"] == pytest.approx(f1[c])
        assert pc["specificity"] == pytest.approx(tn / (tn + fp))
        assert pc["accuracy"] == pytest.approx((cm[c, c] + tn) / 9)
        assert pc["auc"] == pytest.approx(roc_auc_score(Y_TRUE == c, Y_PROB[:, c]))
    assert report["macro"]["sensitivity"] == pytest.approx(sens.mean())
    assert report["macro"]["auc"] == pytest.approx(np.mean([roc_auc_score(Y_TRUE == c, Y_PROB[:, c]) for c in range(3)]))
    assert report["class_balance"] == {"normal": 3, "bacterial": 3, "viral": 3}
    # files: JSON equal to the returned report, CSV with one row per image, two valid PNGs
    assert json.loads((tmp_path / "report.json").read_text())["confusion_matrix"] == cm.tolist()
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [f"img{i}" for i in range(9)]
    assert [r["predicted"] for r in rows] == [CLASSES[i] for i in pred]
    assert float(rows[2]["p_viral"]) == pytest.approx(0.5)
    for png in ("confusion_matrix.png", "roc.png"):
        w, h = _png_ok(tmp_path / png)
        assert w > 200 and h > 200
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_figures_are_valid_pngs_and_reject_bad_shapes(tmp_path):
    cm = confusion_matrix(Y_TRUE, Y_PROB.argmax(1))
    _png_ok(save_confusion_matrix_png(cm, CLASSES, tmp_path / "cm.png", normalize=True))
    # a class without positives is drawn as "undefined", not an error
    _png_ok(save_roc_png(np.array([0, 0, 1, 1]), np.array([[0.9, 0.1, 0], [0.6, 0.4, 0], [0.3, 0.7, 0], [0.2, 0.8, 0]]),
                         CLASSES, tmp_path / "roc.png"))
    with pytest.raises(ValueError, match="does not match"):
        save_confusion_matrix_png(cm, CLASSES[:2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="does not match"):
        save_roc_png(Y_TRUE, Y_PROB[:, :2], CLASSES, tmp_path / "y.png")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_f_test_hand_example():
    # var([1..5]) = 2.5, var([2,4,..,10]) = 10 -> F = 0.25 with (4, 4) dof.
    # F(4,4) cdf at 0.25 = I_{0.2}(2, 2) = 3*0.2^2 - 2*0.2^3 = 0.104 -> two-sided p = 0.208.
    r = f_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert r.statistic == pytest.approx(0.25)
    assert (r.dof_a, r.dof_b) == (4, 4)
    assert r.var_a == pytest.approx(2.5) and r.var_b == pytest.approx(10.0)
    assert r.p_value == pytest.approx(0.208, abs=1e-12)
    assert f_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10], alternative="less").p_value == pytest.approx(0.104, abs=1e-12)
    assert f_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10], alternative="greater").p_value == pytest.approx(0.896, abs=1e-12)
    # symmetric: swapping the samples inverts F and keeps the two-sided p
    s = f_test([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    assert s.statistic == pytest.approx(4.0) and s.p_value == pytest.approx(r.p_value)


def test_f_test_on_known_distributions():
    rng = np.random.default_rng(0)
    # different spreads (sd 1 vs 2): F near 1/4, overwhelming evidence
    r = f_test(rng.normal(0, 1, 400), rng.normal(5, 2, 400))
    assert 0.2 < r.statistic < 0.3 and r.p_value < 1e-20
    # same distribution: the test's false-positive rate at 0.05 is close to 0.05
    ps = [f_test(rng.normal(0, 1, 30), rng.normal(3, 1, 30)).p_value for _ in range(400)]
    assert 0.02 < np.mean(np.asarray(ps) < 0.05) < 0.09


def test_f_test_between_models_uses_true_class_probabilities():
    y = np.array([0, 1, 2])
    a = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6]])
    b = np.array([[0.4, 0.5, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    assert true_class_probabilities(y, a).tolist() == pytest.approx([0.8, 0.6, 0.6])
    r = compare_models_f_test(y, a, b)
    assert r.statistic == pytest.approx(np.var([0.8, 0.6, 0.6], ddof=1) / np.var([0.4, 0.8, 0.8], ddof=1))
    assert "true class" in r.compared
    with pytest.raises(ValueError, match="zero variance"):
        f_test([1, 2, 3], [4, 4, 4])
    with pytest.raises(ValueError, match="at least 2"):
        f_test([1.0], [1, 2])


def test_threshold_is_mean_viral_probability_hand_computed(tmp_path):
    # mean of the viral column: (0.1+0.1+0.5+0.1+0.1+0.3+0.7+0.4+0.3)/9 = 2.6/9
    assert viral_threshold_from_probabilities(Y_PROB, 2) == pytest.approx(2.6 / 9)
    # restricted to the true-viral images: (0.7+0.4+0.3)/3
    assert viral_threshold_from_probabilities(Y_PROB, 2, Y_TRUE, only_class=2) == pytest.approx(1.4 / 3)
    with pytest.raises(ValueError, match="no calibration image"):
        viral_threshold_from_probabilities(Y_PROB[:3], 2, Y_TRUE[:3], only_class=2)
    f = tmp_path / "models" / "viral_threshold.json"
    rec = write_viral_threshold(f, 2.6 / 9, calibration_set="hand:9", num_images=9)
    back = read_viral_threshold(f)
    assert back["viral_threshold"] == pytest.approx(2.6 / 9)
    assert back["calibration_set"] == "hand:9" and back["date"] == rec["date"]
    f.write_text('{"threshold": 0.3}')
    with pytest.raises(ThresholdFileError, match="viral_threshold.json"):
        read_viral_threshold(f)
    f.write_text('{"viral_threshold": 1.7}')
    with pytest.raises(ThresholdFileError, match="not a probability"):
        read_viral_threshold(f)
    with pytest.raises(ThresholdFileError, match="calibrate"):
        read_viral_threshold(tmp_path / "missing.json")


class _LogitsAreTheInput(torch.nn.Module):
    """A 'network' whose logits are its input: the evaluator's probabilities are then known in advance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _run_evaluator(handler, logits: np.ndarray, labels: np.ndarray) -> None:
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator
    from monai.transforms import Activationsd

    data = [
        {"image": torch.tensor(lg, dtype=torch.float32), "label": int(y), "name": f"case{i}"}
        for i, (lg, y) in enumerate(zip(logits, labels))
    ]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=4),
        network=_LogitsAreTheInput(),
        postprocessing=Activationsd(keys="pred", softmax=True),
        val_handlers=[handler],
    )
    evaluator.run()


def test_calibrator_handler_stores_mean_viral_probability(tmp_path):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(10, 3))
    labels = np.arange(10) % 3
    softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = tmp_path / "models" / "viral_threshold.json"
    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    cal = ViralThresholdCalibrator(out, CLASSES, viral_index=2, calibration_set="test:10", model_file=model,
                                   extra={"spatial_size": [64, 64]})
    _run_evaluator(cal, logits, labels)
    rec = json.loads(out.read_text())
    assert rec["viral_threshold"] == pytest.approx(softmax[:, 2].mean(), abs=1e-6)
    assert rec["num_images"] == 10 and rec["class_counts"] == {"normal": 4, "bacterial": 3, "viral": 3}
    assert rec["spatial_size"] == [64, 64] and len(rec["model_sha256"]) == 64
    assert (tmp_path / "models" / "calibration_report.json").is_file()
    only = ViralThresholdCalibrator(tmp_path / "viral_only.json", CLASSES, only_class=2)
    _run_evaluator(only, logits, labels)
    assert only.record["viral_threshold"] == pytest.approx(softmax[labels == 2, 2].mean(), abs=1e-6)


def test_evaluation_writer_handler_writes_report_and_figures(tmp_path):
    logits = np.log(Y_PROB)  # softmax(log p) = p
    writer = EvaluationReportWriter(tmp_path / "eval", CLASSES, title="unit")
    _run_evaluator(writer, logits, Y_TRUE)
    rep = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert rep["confusion_matrix"] == confusion_matrix(Y_TRUE, Y_PROB.argmax(1)).tolist()
    assert rep["per_class"]["viral"]["auc"] == pytest.approx(roc_auc_score(Y_TRUE == 2, Y_PROB[:, 2]))
    assert [s["name"] for s in rep["scans"]] == [f"case{i}" for i in range(9)]
    assert rep["figures"] == ["confusion_matrix.png", "roc.png"]
    for png in rep["figures"]:
        _png_ok(tmp_path / "eval" / png)


def test_f_test_between_two_evaluation_reports(tmp_path, capsys):
    from ctcovid.cli.main import main
    from ctcovid.cxr.evaluation import compare_reports_f_test

    writer_a = EvaluationReportWriter(tmp_path / "a", CLASSES)
    _run_evaluator(writer_a, np.log(Y_PROB), Y_TRUE)
    sharper = Y_PROB**3 / (Y_PROB**3).sum(1, keepdims=True)  # same ranking, more extreme probabilities
    writer_b = EvaluationReportWriter(tmp_path / "b", CLASSES)
    _run_evaluator(writer_b, np.log(sharper), Y_TRUE)
    res = compare_reports_f_test(tmp_path / "a" / "report.json", tmp_path / "b" / "report.json")
    pa, pb = true_class_probabilities(Y_TRUE, Y_PROB), true_class_probabilities(Y_TRUE, sharper)
    assert res["statistic"] == pytest.approx(np.var(pa, ddof=1) / np.var(pb, ddof=1), rel=1e-4)
    assert res["num_images"] == 9 and res["accuracy_a"] == res["accuracy_b"] == pytest.approx(6 / 9)
    assert main(["cxr", "f-test", str(tmp_path / "a" / "report.json"), str(tmp_path / "b" / "report.json"),
                 "--out", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["p_value"] == pytest.approx(res["p_value"])
    # reports on different images cannot be compared
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    rep["scans"] = rep["scans"][:-1]
    with pytest.raises(ValueError, match="same"):
        compare_reports_f_test(tmp_path / "a" / "report.json", rep)
    capsys.readouterr()
    assert main(["cxr", "f-test", str(tmp_path / "a" / "report.json"), str(tmp_path / "missing.json")]) == 2
    assert "cannot compare" in capsys.readouterr().err
