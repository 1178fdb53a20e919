"""The two Cascade-SEME bundles through ``monai.bundle``: metadata and network I/O, the committed patient-level
splits, a short real training whose checkpoint the inference config loads, the calibrate config (Th_Vir checked
against a hand computation), the evaluate config's paper-style outputs, and one end-to-end cascade run on real
radiographs with the short-trained weights. Reduced sizes (64x64 inputs, a few images) keep it short; the
architectures are the real ones."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_path
from monai.bundle import ConfigWorkflow
from monai.transforms import Resize
from PIL import Image

from ctcovid.bundle import bundles_root
from ctcovid.cxr import STAGE1_BUNDLE, STAGE2_BUNDLE, CXRCascade, run_cascade
from ctcovid.cxr.datalists import (
    STAGE1_CLASSES,
    STAGE2_CLASSES,
    ieee8023_viral_items,
    kermany_items,
    load_datalist,
    make_datalist,
)
from ctcovid.io import load_xray
from ctcovid.networks import SEDenseNet169, SEResNet50
from ctcovid.running.resume import sha256_file

BUNDLES = {
    STAGE1_BUNDLE: {"net": SEResNet50, "classes": STAGE1_CLASSES, "data": ("cxr", "kermany"), "train_limit": 6},
    STAGE2_BUNDLE: {"net": SEDenseNet169, "classes": STAGE2_CLASSES, "data": ("cxr", "ieee8023"), "train_limit": 4},
}
SIZE = [64, 64]


def _run(bundle_dir: Path, configs: list[str], **overrides) -> ConfigWorkflow:
    files = [str(bundle_dir / "configs" / c) for c in configs]
    overrides.setdefault("ckpt_dir", str(bundle_dir / "models"))  # never the user's ~/.cache training folder
    wf = ConfigWorkflow(config_file=files, workflow_type=None, bundle_root=str(bundle_dir), logging_file=False,
                        **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def _probabilities(net_cls, n_classes: int, weights: Path, images: list[str]) -> np.ndarray:
    """Independent forward pass: fresh network + saved state dict, preprocessing written out by hand."""
    net = net_cls(num_classes=n_classes)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.eval()
    resize = Resize(SIZE, mode="bilinear", anti_aliasing=True)
    x = torch.stack([resize(load_xray(f)).as_tensor().repeat(3, 1, 1) for f in images])
    with torch.no_grad():
        return torch.softmax(net(x), dim=1).numpy()


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    """Both bundles copied (configs only) and trained for one short epoch on real images."""
    root = tmp_path_factory.mktemp("cxr_trained")
    for name, spec in BUNDLES.items():
        data_path(*spec["data"])
        shutil.copytree(bundles_root() / name / "configs", root / name / "configs")
        n = spec["train_limit"]
        _run(root / name, ["train.json"], spatial_size=SIZE, train_limit=n, val_limit=len(spec["classes"]), epochs=1,
             batch_size=n // 2, val_batch_size=4, num_workers=0)
    return root


@pytest.mark.parametrize("name", list(BUNDLES))
def test_committed_datalist_is_split_by_patient(name):
    spec = BUNDLES[name]
    root = data_path(*spec["data"])
    dl = json.loads((bundles_root() / name / "configs" / "datalist.json").read_text())
    parts = [k for k in ("training", "validation", "calibration", "test") if k in dl]
    patients = {k: {it["patient"] for it in dl[k]} for k in parts}
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            assert not patients[a] & patients[b], f"{name}: patients shared by {a} and {b}"
    # relative paths that exist, labels as in labels.csv, every class in every part
    items = kermany_items(root) if name == STAGE1_BUNDLE else ieee8023_viral_items(root)
    truth = {it["image"]: it["label"] for it in items}
    listed = [it for k in parts for it in dl[k]]
    assert sorted(it["image"] for it in listed) == sorted(truth)
    assert all(not Path(it["image"]).is_absolute() and (root / it["image"]).is_file() for it in listed)
    assert all(truth[it["image"]] == it["label"] for it in listed)
    for k in parts:
        assert set(dl["counts"][k]["images"].values()) and min(dl["counts"][k]["images"].values()) > 0, k
    # deterministic: rebuilding gives the committed split
    fractions = dl["split"]["fractions"]
    rebuilt = make_datalist(items, fractions, spec["classes"], dl["description"], seed=dl["split"]["seed"])
    assert all(rebuilt[k] == dl[k] for k in parts)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_short_training_checkpoint_is_loaded_by_inference(trained_root, name, tmp_path):
    spec = BUNDLES[name]
    bdir = trained_root / name
    weights = bdir / "models" / "model.pt"
    assert weights.is_file()
    info = json.loads((bdir / "models" / "train_info.json").read_text())
    assert info["spatial_size"] == SIZE and info["moex"] is True
    assert sum(info["training_images"].values()) == spec["train_limit"]
    assert (bdir / "models" / "train_logs" / "metrics.csv").is_file()
    data = data_path(*spec["data"])
    images = [it["image"] for it in load_datalist(bdir / "configs" / "datalist.json", "test", data, limit=3)]
    datalist = [{"image": f, "name": Path(f).name} for f in images]
    _run(bdir, ["inference.json"], spatial_size=SIZE, datalist=datalist, output_dir=str(tmp_path), num_workers=0)
    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    got = np.array([[float(r[f"prob_{c}"]) for c in spec["classes"]] for r in rows])
    expected = _probabilities(spec["net"], len(spec["classes"]), weights, images)
    np.testing.assert_allclose(got, expected, atol=1e-4)  # the trained weights, not random ones, were used
    assert [r["status"] for r in rows] == ["ok"] * 3


def test_inference_refuses_to_run_without_weights(tmp_path):
    bdir = tmp_path / STAGE2_BUNDLE
    shutil.copytree(bundles_root() / STAGE2_BUNDLE / "configs", bdir / "configs")
    img = next(data_path("cxr", "ieee8023", "images").iterdir())
    with pytest.raises(Exception) as exc:
        _run(bdir, ["inference.json"], spatial_size=SIZE, datalist=[{"image": str(img), "name": "x"}],
             output_dir=str(tmp_path / "o"), num_workers=0)
    chain, e = [], exc.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(c, FileNotFoundError) and "train.json" in str(c) for c in chain)
    assert not (tmp_path / "o" / "predictions.csv").exists()


@pytest.mark.slow
def test_calibrate_config_stores_mean_viral_probability(trained_root):
    bdir = trained_root / STAGE1_BUNDLE
    _run(bdir, ["train.json", "calibrate.json"], spatial_size=SIZE, val_limit=6, num_workers=0)
    rec = json.loads((bdir / "models" / "viral_threshold.json").read_text())
    images = [it["image"] for it in load_datalist(bdir / "configs" / "datalist.json", "calibration",
                                                  data_path("cxr", "kermany"), limit=6)]
    p = _probabilities(SEResNet50, 3, bdir / "models" / "model.pt", images)
    assert rec["viral_threshold"] == pytest.approx(p[:, 2].mean(), abs=1e-5)  # hand computation
    assert rec["num_images"] == 6 and rec["class_counts"] == {"normal": 2, "bacterial": 2, "viral": 2}
    assert rec["calibration_set"].startswith("datalist.json:calibration")
    assert rec["model_sha256"] == sha256_file(bdir / "models" / "model.pt")
    assert rec["spatial_size"] == SIZE and rec["date"]


@pytest.mark.slow
def test_evaluate_config_writes_paper_report(trained_root):
    bdir = trained_root / STAGE2_BUNDLE
    _run(bdir, ["train.json", "evaluate.json"], spatial_size=SIZE, val_limit=4, num_workers=0)
    rep = json.loads((bdir / "eval" / "report.json").read_text())
    assert rep["num_samples"] == 4 and rep["class_balance"] == {"COVID-19": 2, "viral-other": 2}
    assert np.asarray(rep["confusion_matrix"]).sum() == 4
    for c in STAGE2_CLASSES:
        assert set(rep["per_class"][c]) >= {"sensitivity", "specificity", "precision", "f1", "accuracy", "auc"}
    assert rep["split"] == "test" and rep["spatial_size"] == SIZE
    for png in ("confusion_matrix.png", "roc.png"):
        with Image.open(bdir / "eval" / png) as im:
            assert im.format == "PNG"


@pytest.mark.slow
def test_cascade_end_to_end_on_real_radiographs(trained_root, tmp_path):
    _run(trained_root / STAGE1_BUNDLE, ["train.json", "calibrate.json"], spatial_size=SIZE, val_limit=3, num_workers=0)
    threshold = json.loads((trained_root / STAGE1_BUNDLE / "models" / "viral_threshold.json").read_text())
    cascade = CXRCascade.from_bundles(trained_root, device="cpu")
    assert cascade.stage1.spatial_size == SIZE and cascade.stage2.spatial_size == SIZE  # from train_info.json
    assert cascade.threshold == threshold["viral_threshold"] and not cascade.warnings
    k = load_datalist(trained_root / STAGE1_BUNDLE / "configs" / "datalist.json", "test", data_path("cxr", "kermany"),
                      limit=3)
    v = load_datalist(trained_root / STAGE2_BUNDLE / "configs" / "datalist.json", "test",
                      data_path("cxr", "ieee8023"), limit=2)
    files = [it["image"] for it in k + v]
    report = run_cascade(cascade, files, tmp_path)
    assert report.ok == len(files)
    for row in report.rows:
        passed = float(row["p_viral"]) > threshold["viral_threshold"]
        assert row["passed_threshold"] == str(passed).lower()
        assert (row["p_covid19"] != "") == passed
        assert row["label"] in (("COVID-19", "viral-other") if passed else ("normal", "bacterial"))
        with Image.open(tmp_path / row["overlay_png"]) as im:
            assert im.format == "PNG" and im.mode == "RGB"


@pytest.mark.slow
def test_regional_learning_with_segmenter_masks(tmp_path):
    """Masks from the X-ray lung segmenter's bundle (untrained, seeded weights here: this checks the plumbing --
    masks written at each image's size where train_regional.json looks for them -- not mask quality), then a
    regional-learning training step whose network sees every image twice (original + lung-only copy)."""
    from monai.bundle import ConfigParser

    from ctcovid.cxr.masks import LUNG_SEGMENTATION_BUNDLE, mask_path, predict_lung_masks

    ieee = data_path("cxr", "ieee8023")
    root = tmp_path / "bundles"
    for name in (LUNG_SEGMENTATION_BUNDLE, STAGE2_BUNDLE):
        shutil.copytree(bundles_root() / name / "configs", root / name / "configs")
    seg = ConfigParser()
    seg.read_config(str(root / LUNG_SEGMENTATION_BUNDLE / "configs" / "inference.json"))
    seg["bundle_root"] = str(root / LUNG_SEGMENTATION_BUNDLE)
    torch.manual_seed(0)
    (root / LUNG_SEGMENTATION_BUNDLE / "models").mkdir()
    torch.save(seg.get_parsed_content("network_def").state_dict(), root / LUNG_SEGMENTATION_BUNDLE / "models" / "model.pt")

    datalist = root / STAGE2_BUNDLE / "configs" / "datalist.json"
    with pytest.raises(FileNotFoundError, match="no manual lung mask"):  # other-viral images have none
        load_datalist(datalist, "training", ieee, lung_masks=True)
    items = load_datalist(datalist, "training", ieee, limit=4)
    masks = tmp_path / "masks"
    assert predict_lung_masks(items, masks, bundle_dir=root) == {"written": 4, "existing": 0, "failed": 0}
    for it in items:
        with Image.open(mask_path(masks, it["name"])) as m:
            arr = np.asarray(m)
        assert arr.shape == tuple(load_xray(it["image"]).shape[1:]) and set(np.unique(arr)) <= {0, 255}
    assert predict_lung_masks(items, masks, bundle_dir=root)["existing"] == 4

    wf = _run(root / STAGE2_BUNDLE, ["train.json", "train_regional.json"], spatial_size=SIZE, train_limit=4,
              val_limit=2, epochs=1, batch_size=2, num_workers=0, mask_root=str(masks))
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert len(trainer.state.output) == 4  # a batch of 2 images became 2 originals + 2 lung-only copies
    assert (root / STAGE2_BUNDLE / "models" / "model.pt").is_file()
    assert json.loads((root / STAGE2_BUNDLE / "models" / "train_info.json").read_text())["moex"] is False


@pytest.mark.slow
def test_stopped_training_resumes_where_it_was(tmp_path):
    """Stage-1 training stopped after epoch 1 of 2 (the process ends): ``--resume True`` restores the model,
    optimizer, schedule and best metric from the epoch checkpoint and runs epoch 2 only."""
    from ctcovid.training.handlers import latest_checkpoint

    data_path("cxr", "kermany")
    bdir = tmp_path / STAGE1_BUNDLE
    shutil.copytree(bundles_root() / STAGE1_BUNDLE / "configs", bdir / "configs")
    small = dict(spatial_size=SIZE, train_limit=6, val_limit=3, batch_size=3, val_batch_size=3, num_workers=0, epochs=2)
    first = _run(bdir, ["train.json"], **{**small, "epochs": 2}, **{"train#trainer#max_epochs": 1})
    assert first.parser.get_parsed_content("train#trainer").state.epoch == 1
    ckpt = bdir / "models"
    assert latest_checkpoint(ckpt).endswith("epoch=1.pt")
    resumed = _run(bdir, ["train.json"], **small, resume=True)
    state = resumed.parser.get_parsed_content("train#trainer").state
    assert state.epoch == 2 and state.iteration == 4  # 2 iterations per epoch, the first epoch not repeated
    assert latest_checkpoint(ckpt).endswith("epoch=2.pt")
    epochs = [row["epoch"] for row in csv.DictReader(open(ckpt / "train_logs" / "metrics.csv"))]
    # the resumed run appended epoch 2 to the stopped run's log; a resume that restarted from scratch would
    # have logged epochs 1 and 2 again (1, 1, 2)
    assert epochs == ["1", "2"]
    # the cosine schedule went on from where it stopped (T_max = 2 epochs: the last lr is 0)
    assert float(list(csv.DictReader(open(ckpt / "train_logs" / "metrics.csv")))[-1]["lr"]) == pytest.approx(0.0, abs=1e-9)
