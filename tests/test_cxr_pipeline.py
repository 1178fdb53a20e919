"""The X-ray cascade's routing logic (stub networks whose outputs the test controls), its batch outputs, and the
``ctcovid cxr`` command line: exit codes, failed rows for bad images, plain errors for missing weights.

The real end-to-end run with short-trained bundle weights is in ``test_bundle_cxr_cascade.py``.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import data_path
from monai.transforms import Resize
from PIL import Image

from ctcovid.bundle import bundles_root
from ctcovid.cli.main import main
from ctcovid.cxr import (
    STAGE1_BUNDLE,
    STAGE2_BUNDLE,
    CascadeWeightsError,
    CXRCascade,
    CXRStage,
    run_cascade,
)
from ctcovid.cxr.evaluation import ThresholdFileError, write_viral_threshold
from ctcovid.io import load_xray
from ctcovid.io.errors import CTInputError


class MeanIntensityStage1(nn.Module):
    """Stub stage 1: P(viral) = mean input intensity m, P(normal) = 0.7 (1 - m), P(bacterial) = 0.3 (1 - m).

    A 1x1 convolution (identity weights) is the Grad-CAM layer, so the stub is explainable like the real one.
    """

    gradcam_layer = "features"
    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3)[:, :, None, None])
            self.features.bias.zero_()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        m = self.features(x).mean(dim=(1, 2, 3)).clamp(1e-4, 1 - 1e-4)
        return torch.log(torch.stack([0.7 * (1 - m), 0.3 * (1 - m), m], dim=1))


class FixedStage2(nn.Module):
    """Stub stage 2: always P(COVID-19) = 0.8; counts its calls."""

    gradcam_layer = "features"
    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 2, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        f = self.features(x).mean(dim=(2, 3))
        return f - f.detach() + torch.log(torch.tensor([[0.8, 0.2]]))  # value fixed, gradient flows


def _grey_png(path, level: int, size=(32, 32)) -> str:
    """A uniform grey PNG; at the stub's input size (32x32) no resizing blurs its mean."""
    Image.fromarray(np.full(size, level, dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture()
def stub_cascade():
    def make(threshold: float, size: int = 32) -> CXRCascade:
        s1 = CXRStage(MeanIntensityStage1(), ["normal", "bacterial", "viral"], spatial_size=(size, size), name="stage 1")
        s2 = CXRStage(FixedStage2(), ["COVID-19", "viral-other"], spatial_size=(size, size), name="stage 2")
        return CXRCascade(s1, s2, threshold)

    return make


def test_routes_only_images_above_the_threshold(tmp_path, stub_cascade):
    levels = [26, 77, 128, 179, 230]  # mean intensities ~0.10, 0.30, 0.50, 0.70, 0.90
    files = [_grey_png(tmp_path / f"g{lv}.png", lv) for lv in levels]
    cascade = stub_cascade(0.5)
    results = [cascade.predict(f) for f in files]
    pv = [r.viral_probability for r in results]
    assert pv == pytest.approx([lv / 255 for lv in levels], abs=1e-5)
    assert [r.passed_threshold for r in results] == [False, False, True, True, True]  # 128/255 = 0.502 > 0.5
    assert cascade.stage2.network.calls == 3  # stage 2 saw exactly the images above the threshold
    for r in results:
        if r.passed_threshold:
            assert r.label == "COVID-19" and r.decided_by == "stage 2"
            assert r.stage2_probabilities["COVID-19"] == pytest.approx(0.8, abs=1e-6)
        else:
            # below the threshold the label is stage 1's arg-max over normal / bacterial
            assert r.label == "normal" and r.decided_by == "stage 1" and r.stage2_probabilities is None
        assert r.viral_threshold == 0.5


def test_explained_stage_2_runs_once_and_answers_as_without_the_overlay(tmp_path, stub_cascade):
    """With an overlay, stage 2's probabilities come from the Grad-CAM forward pass itself: one call per image,
    the same probabilities and label as without Grad-CAM."""
    f = _grey_png(tmp_path / "g.png", 204)
    plain = stub_cascade(0.5).predict(f)
    explained_cascade = stub_cascade(0.5)
    explained = explained_cascade.predict(f, overlay_path=tmp_path / "cam.png")
    assert explained_cascade.stage2.network.calls == 1
    assert explained.label == plain.label == "COVID-19" and explained.gradcam["stage"] == "stage 2"
    assert explained.stage2_probabilities == pytest.approx(plain.stage2_probabilities, abs=1e-7)
    assert Image.open(explained.overlay_png).size == (32, 32)
    assert all(p.requires_grad and p.grad is None for p in explained_cascade.stage2.network.parameters())


def test_threshold_is_strict_and_comes_from_the_stored_value(tmp_path, stub_cascade):
    f = _grey_png(tmp_path / "g.png", 153)
    p = stub_cascade(0.0).predict(f).viral_probability
    at = stub_cascade(p)  # exactly at the threshold: not above it
    r = at.predict(f)
    assert r.passed_threshold is False and at.stage2.network.calls == 0
    below = stub_cascade(np.nextafter(p, 0.0)).predict(f)
    assert below.passed_threshold is True and below.label == "COVID-19"
    # stage2_for_all (evaluation scores) reports stage 2 but keeps the threshold's decision
    r_all = stub_cascade(0.9).predict(f, stage2_for_all=True)
    assert r_all.passed_threshold is False and r_all.label == "normal" and r_all.stage2_probabilities is not None
    with pytest.raises(ValueError, match="not a probability"):
        stub_cascade(1.5)


def test_batch_run_outputs_and_failed_rows(tmp_path, stub_cascade):
    good = [_grey_png(tmp_path / "a.png", 200, (40, 48)), _grey_png(tmp_path / "b.png", 30)]
    sub = tmp_path / "other"
    sub.mkdir()
    dup = _grey_png(sub / "a.png", 100)  # same file name as a.png: output ids must not collide
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    report = run_cascade(stub_cascade(0.5), [good[0], str(corrupt), good[1], dup, tmp_path / "missing.dcm"],
                         tmp_path / "out")
    assert report.ok == 3 and report.failed == 2
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == ["a", "broken", "b", "a_2", "missing"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok", "failed"]
    assert "broken.png" in rows[1]["reason"] and "missing.dcm" in rows[4]["reason"]
    assert rows[0]["label"] == "COVID-19" and rows[0]["passed_threshold"] == "true"
    assert rows[2]["label"] == "normal" and rows[2]["p_covid19"] == ""
    rec = json.loads((tmp_path / "out" / "a.json").read_text())
    assert rec["stage1_probabilities"]["viral"] == pytest.approx(200 / 255, abs=2e-3)  # resized 40x48 -> 32x32
    assert rec["gradcam"]["stage"] == "stage 2" and rec["overlay_png"] == "a_gradcam.png"
    with Image.open(tmp_path / "out" / "a_gradcam.png") as im:
        assert im.format == "PNG" and im.size == (48, 40) and im.mode == "RGB"  # original size, colour
    failed = json.loads((tmp_path / "out" / "broken.json").read_text())
    assert failed["status"] == "failed" and failed["label"] is None
    with pytest.raises(CTInputError):
        stub_cascade(0.5).predict(corrupt)


def test_issue_bad_input_list_in_one_batch(tmp_path, stub_cascade):
    """Issue 18's bad inputs in one run: unusable files (not an image, 1x1 pixel, corrupt) get a failed row
    naming the file and the problem and no overlay; readable odd formats (16-bit PNG, MONOCHROME1 DICOM, CMYK
    JPEG) are read; the batch goes on and leaves no temporary file."""
    src = data_path("cxr", "ieee8023", "images", "02b76460.jpg")
    grey = Image.open(src).convert("L")
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "notes.txt").write_text("not an image")
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(inputs / "one_pixel.png")
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(inputs / "sixteen_bit.png")
    shutil.copy(data_path("fixtures", "pydicom_data_pypi", "RG1_UNCR.dcm"), inputs / "mono1.dcm")
    grey.convert("CMYK").save(inputs / "cmyk.jpg")
    data = src.read_bytes()
    (inputs / "corrupt.jpg").write_bytes(data[: len(data) // 3])
    files = sorted(str(f) for f in inputs.iterdir())
    report = run_cascade(stub_cascade(0.5), files, tmp_path / "out")
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    failed = {"notes.txt": "unsupported format", "one_pixel": "1x1 pixels", "corrupt": "truncated or corrupt"}
    assert report.failed == 3 and report.ok == 3
    for name, why in failed.items():
        assert rows[name]["status"] == "failed" and why in rows[name]["reason"]
        assert rows[name]["reason"].startswith(str(inputs))  # names the file
        assert not (tmp_path / "out" / f"{name}_gradcam.png").exists()
    for name in ("sixteen_bit", "mono1", "cmyk"):
        assert rows[name]["status"] == "ok" and (tmp_path / "out" / f"{name}_gradcam.png").is_file()
    assert not [f for f in (tmp_path / "out").iterdir() if f.name.endswith(".tmp") or f.name.startswith(".")]


def test_batch_rerun_resumes_and_force_recomputes(tmp_path, stub_cascade):
    """The cascade runs on the shared batch runner: a re-run reuses finished images (their rows rebuilt from
    the JSON records), retries failed ones, and recomputes an image whose content or threshold changed."""
    a, b = _grey_png(tmp_path / "a.png", 200), _grey_png(tmp_path / "b.png", 30)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "out"
    first = run_cascade(stub_cascade(0.5), [a, b, broken], out)
    assert [r["status"] for r in first.rows] == ["ok", "ok", "failed"]
    mtime = (out / "a.json").stat().st_mtime_ns

    again = run_cascade(stub_cascade(0.5), [a, b, broken], out)
    assert [(r["status"], r["reused"]) for r in again.rows] == [("ok", True), ("ok", True), ("failed", False)]
    assert [r["label"] for r in again.rows[:2]] == [r["label"] for r in first.rows[:2]]
    assert [r["p_viral"] for r in again.rows[:2]] == [r["p_viral"] for r in first.rows[:2]]
    assert (out / "a.json").stat().st_mtime_ns == mtime and (out / "a_gradcam.png").is_file()

    _grey_png(tmp_path / "b.png", 180)  # new content: recomputed, now above the threshold
    changed = run_cascade(stub_cascade(0.5), [a, b], out)
    assert [r["reused"] for r in changed.rows] == [True, False] and changed.rows[1]["label"] == "COVID-19"
    other_threshold = run_cascade(stub_cascade(0.9), [a], out)  # options are part of the resume key
    assert other_threshold.rows[0]["reused"] is False and other_threshold.rows[0]["label"] == "normal"
    forced = run_cascade(stub_cascade(0.9), [a], out, force=True)
    assert forced.rows[0]["reused"] is False and forced.rows[0]["status"] == "ok"


def test_real_radiographs_route_through_stub_stage1(tmp_path, stub_cascade):
    """Real files (8-bit Kermany JPEG, ieee8023 JPEG, a MONOCHROME1 DICOM) go through reading and routing."""
    kermany = data_path("cxr", "kermany", "train", "NORMAL", "IM-0115-0001.jpeg")
    ieee = data_path("cxr", "ieee8023", "images")
    dicom = data_path("fixtures", "pydicom_data_pypi", "RG1_UNCR.dcm")
    files = [str(kermany), str(sorted(ieee.iterdir())[0]), str(dicom)]
    # the stub's P(viral) is the mean of the preprocessed image
    expected = [float(Resize((128, 128), mode="bilinear", anti_aliasing=True)(load_xray(f)).mean()) for f in files]
    thr = float(np.median(expected))
    cascade = stub_cascade(thr, size=128)
    report = run_cascade(cascade, files, tmp_path / "out", gradcam=False)
    assert report.ok == 3
    for row, e in zip(report.rows, expected):
        assert float(row["p_viral"]) == pytest.approx(e, abs=1e-5)
        assert row["passed_threshold"] == str(e > thr).lower()
    assert [r["passed_threshold"] for r in report.rows].count("true") == 1  # only the one above the median


def test_cascade_evaluation_decisions_and_scores(tmp_path, stub_cascade):
    """4-class evaluation: metrics from the threshold decisions, AUC from the continuous scores (hand-computed)."""
    from ctcovid.cxr import evaluate_cascade

    levels = {"normal": 26, "bacterial": 77, "viral-other": 179, "COVID-19": 230}
    items = [{"image": _grey_png(tmp_path / f"{k}.png", lv), "label": k} for k, lv in levels.items()]
    items.append({"image": str(tmp_path / "absent.png"), "label": "normal"})
    rep = evaluate_cascade(stub_cascade(0.5), items, tmp_path / "eval")
    # decisions: m <= 0.5 -> stage 1's normal (0.7 (1-m) > 0.3 (1-m)); m > 0.5 -> stage 2's COVID-19 (0.8)
    assert rep["confusion_matrix"] == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]]
    assert rep["accuracy"] == pytest.approx(0.5) and rep["passed_threshold"] == 2
    # scores [0.7 (1-m), 0.3 (1-m), 0.2 m, 0.8 m]: normal and COVID-19 rank perfectly, the other two 2/3
    aucs = {c: rep["per_class"][c]["auc"] for c in levels}
    assert aucs == pytest.approx({"normal": 1.0, "bacterial": 2 / 3, "viral-other": 2 / 3, "COVID-19": 1.0})
    assert rep["macro"]["auc"] == pytest.approx(5 / 6)
    assert [f["image"] for f in rep["failed"]] == [str(tmp_path / "absent.png")]
    for png in ("confusion_matrix.png", "roc.png"):
        with Image.open(tmp_path / "eval" / png) as im:
            assert im.format == "PNG"
    with open(tmp_path / "eval" / "predictions.csv", newline="") as fh:
        assert [r["predicted"] for r in csv.DictReader(fh)] == ["normal", "normal", "COVID-19", "COVID-19"]


# --------------------------------------------------------------------------------------- command line


def copy_bundles_with_random_weights(root, threshold: float = 0.2):
    """Copies of both cascade bundles' configs under ``root`` with untrained (random, seeded) weights and a
    stored threshold."""
    from ctcovid.networks import SEDenseNet169, SEResNet50

    torch.manual_seed(0)
    for name, net in ((STAGE1_BUNDLE, SEResNet50(num_classes=3)), (STAGE2_BUNDLE, SEDenseNet169(num_classes=2))):
        shutil.copytree(bundles_root() / name / "configs", root / name / "configs")
        (root / name / "models").mkdir()
        torch.save(net.state_dict(), root / name / "models" / "model.pt")
    write_viral_threshold(root / STAGE1_BUNDLE / "models" / "viral_threshold.json", threshold, calibration_set="test")
    return root


@pytest.fixture(scope="module")
def random_weight_bundles(tmp_path_factory):
    """Both bundles with random weights: enough to test the command line's behaviour; the real trained run is in
    test_bundle_cxr_cascade.py."""
    return copy_bundles_with_random_weights(tmp_path_factory.mktemp("cxr_bundles"))


def test_cli_exit_codes_and_failed_rows(tmp_path, random_weight_bundles, capsys):
    good = str(data_path("cxr", "kermany", "train", "NORMAL", "IM-0115-0001.jpeg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    common = ["--bundle-dir", str(random_weight_bundles), "--spatial-size", "64", "--device", "cpu"]
    rc = main(["cxr", "predict", good, str(bad), "--out", str(tmp_path / "o1"), "--no-gradcam", *common])
    assert rc == 1
    with open(tmp_path / "o1" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "bad.jpg" in rows[1]["reason"] and rows[0]["label"] in ("normal", "bacterial", "viral-other", "COVID-19")
    rec = json.loads((tmp_path / "o1" / "IM-0115-0001.json").read_text())
    assert rec["passed_threshold"] == (rec["viral_probability"] > 0.2)
    assert (rec["stage2_probabilities"] is not None) == rec["passed_threshold"]
    assert rec["models"]["stage1"]["spatial_size"] == [64, 64]
    # each stage's intended use (the stage-1 bundle's says the adult COVID-19 answer is at chance) travels along
    for stage, bundle in (("stage1", STAGE1_BUNDLE), ("stage2", STAGE2_BUNDLE)):
        meta = json.loads((random_weight_bundles / bundle / "configs" / "metadata.json").read_text())
        assert rec["models"][stage]["intended_use"] == meta["intended_use"] and "not a medical device" in meta["intended_use"]

    rc = main(["cxr", "predict", good, "--out", str(tmp_path / "o2"), *common])
    assert rc == 0
    rec = json.loads((tmp_path / "o2" / "IM-0115-0001.json").read_text())
    with Image.open(tmp_path / "o2" / rec["overlay_png"]) as im:
        assert im.size == (224, 224) and im.mode == "RGB"

    # missing weights: plain message naming the bundle, exit 3, nothing written
    broken = tmp_path / "bundles"
    shutil.copytree(random_weight_bundles, broken)
    (broken / STAGE2_BUNDLE / "models" / "model.pt").unlink()
    capsys.readouterr()
    rc = main(["cxr", "predict", good, "--out", str(tmp_path / "o3"), "--bundle-dir", str(broken), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 3 and STAGE2_BUNDLE in err and "no trained weights" in err and STAGE1_BUNDLE not in err
    assert not (tmp_path / "o3").exists()
    with pytest.raises(CascadeWeightsError):
        CXRCascade.from_bundles(broken, device="cpu")
    # missing threshold: exit 3 and says how to calibrate
    (random_weight_bundles / STAGE1_BUNDLE / "models" / "viral_threshold.json").rename(tmp_path / "t.json")
    try:
        with pytest.raises(ThresholdFileError):
            CXRCascade.from_bundles(random_weight_bundles, device="cpu")
        rc = main(["cxr", "predict", good, "--out", str(tmp_path / "o4"), *common])
        assert rc == 3 and "calibrate" in capsys.readouterr().err
    finally:
        (tmp_path / "t.json").rename(random_weight_bundles / STAGE1_BUNDLE / "models" / "viral_threshold.json")
    # usage error
    with pytest.raises(SystemExit) as e:
        main(["cxr", "predict", good, "--out", str(tmp_path / "o5"), "--spatial-size", "8"])
    assert e.value.code == 2
