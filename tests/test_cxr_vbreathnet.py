"""V-BreathNet: network shape and size, learning-rate schedule, image-quality filters and class balancing on
real radiographs, the ``ctcovid quality`` command, and the cxr_vbreathnet_classification bundle."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import data_path
from scipy import ndimage

from ctcovid.bundle import bundles_root
from ctcovid.io import load_xray
from ctcovid.io.errors import ImageQualityError
from ctcovid.networks import VBREATHNET_CLASSES, VBreathNet
from ctcovid.transforms import (
    AugmentCopiesd,
    ImageQualityFilter,
    ImageQualityFilterd,
    balance_by_augmentation,
    curate,
    write_curation_report,
)

BUNDLE = "cxr_vbreathnet_classification"
KERMANY_IMG = ("cxr", "kermany", "train", "NORMAL", "IM-0115-0001.jpeg")
IEEE_IMG = ("cxr", "ieee8023", "images", "auntminnie-a-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpg")


# --- network -----------------------------------------------------------------------------------------------
def test_vbreathnet_v_shape_size_and_outputs():
    net = VBreathNet().eval()
    n_params = sum(p.numel() for p in net.parameters())
    assert 700_000 < n_params < 800_000, n_params
    convs = [m for m in net.features.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 64, 32, 64, 128]
    for block in net.features:
        kinds = [type(m) for m in block]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Dropout]
    dense = [m for m in net.classifier if isinstance(m, nn.Linear)]
    assert [d.out_features for d in dense] == [512, 3]
    with torch.no_grad():
        for size in (96, 128, 224):
            logits = net(torch.rand(2, 1, size, size))
            assert logits.shape == (2, 3)
            p = torch.softmax(logits, dim=1)
            assert torch.allclose(p.sum(dim=1), torch.ones(2))
    feats = net.features(torch.rand(1, 1, 96, 96))
    assert feats.shape == (1, 128, 3, 3)  # at the bundle's 96x96 the adaptive pool is the identity
    assert torch.equal(net.pool(feats), feats)


def test_lr_schedule_rmsprop_halving_to_floor():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundles_root() / BUNDLE / "configs" / "train.json"))
    opt = parser.get_parsed_content("optimizer")
    sched = parser.get_parsed_content("lr_scheduler")
    assert isinstance(opt, torch.optim.RMSprop)
    lrs = []
    for _ in range(70):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[4] == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx(5e-4) and lrs[10] == pytest.approx(2.5e-4)
    assert min(lrs) == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-6)


# --- quality filters on real images --------------------------------------------------------------------------
@pytest.mark.parametrize("parts", [KERMANY_IMG, IEEE_IMG])
def test_quality_filter_rejects_blurred_and_contrast_crushed_copies(parts):
    img = load_xray(data_path(*parts))
    arr = img.as_tensor()[0].numpy()
    qf = ImageQualityFilter()
    original = qf.assess(img)
    assert original.passed, original.reasons

    sigma = 2.0 * max(arr.shape) / 224  # 2 px at the 224 analysis size
    blurred = qf.assess(ndimage.gaussian_filter(arr, sigma))
    assert not blurred.passed
    assert [r.split(":")[0] for r in blurred.reasons] == ["blurry"]  # blurring keeps the contrast
    assert blurred.laplacian_variance < original.laplacian_variance / 5

    crushed = qf.assess(0.5 + (arr - arr.mean()) * 0.2)
    assert any(r.startswith("low contrast") for r in crushed.reasons)
    binary = qf.assess((arr > np.median(arr)).astype(np.float32))
    assert any(r.startswith("high contrast") for r in binary.reasons)


def test_quality_filter_raises_naming_the_file_and_dict_twin_marks():
    path = data_path(*KERMANY_IMG)
    img = load_xray(path)
    blurred = img.clone()
    blurred[0] = torch.from_numpy(ndimage.gaussian_filter(img[0].numpy(), 3.0))
    qf = ImageQualityFilter()
    assert qf(img) is img
    with pytest.raises(ImageQualityError, match=r"IM-0115-0001\.jpeg.*blurry"):
        qf(blurred)
    marked = ImageQualityFilterd(keys="image", on_fail="mark")({"image": blurred})
    assert marked["image_quality"]["passed"] is False and marked["image_quality"]["laplacian_variance"] < 15
    with pytest.raises(ImageQualityError):
        ImageQualityFilterd(keys="image")({"image": blurred})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        qf.assess(img * 255)


def test_curate_reports_what_was_removed_and_why(tmp_path):
    from PIL import Image

    arr = load_xray(data_path(*KERMANY_IMG))[0].numpy()
    files = {
        "good.png": arr,
        "blurred.png": ndimage.gaussian_filter(arr, 3.0),
        "faded.png": 0.5 + (arr - arr.mean()) * 0.2,
    }
    for name, a in files.items():
        Image.fromarray(np.clip(np.round(a * 255), 0, 255).astype(np.uint8)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    items = [{"image": str(tmp_path / n), "label": i} for i, n in enumerate([*files, "broken.png"])]
    report = curate(items)
    assert [it["image"] for it in report.kept] == [str(tmp_path / "good.png")]
    reasons = {it["image"].rsplit("/", 1)[1]: it["quality"]["reasons"] for it in report.removed}
    assert [r.split(":")[0] for r in reasons["blurred.png"]] == ["blurry"]
    # the variance of the Laplacian scales with contrast squared, so a faded image fails both checks
    assert [r.split(":")[0] for r in reasons["faded.png"]] == ["blurry", "low contrast"]
    assert reasons["broken.png"][0].startswith("unreadable")
    s = report.summary()
    assert s["total"] == 4 and s["kept"] == 1
    assert s["removed_by_reason"] == {"blurry": 2, "low contrast": 1, "unreadable": 1}
    out = write_curation_report(report, tmp_path / "report.csv")
    with open(out, newline="") as f:
        rows = {r["image"].rsplit("/", 1)[1]: r for r in csv.DictReader(f)}
    assert rows["good.png"]["kept"] == "True" and rows["blurred.png"]["kept"] == "False"


def test_quality_cli(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from ctcovid.cli.main import main

    arr = load_xray(data_path(*KERMANY_IMG))[0].numpy()
    Image.fromarray(np.round(arr * 255).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.round(ndimage.gaussian_filter(arr, 3.0) * 255).astype(np.uint8)).save(tmp_path / "b.png")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / name).rename(images / name)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    rc = main(["quality", str(images), "--out", str(tmp_path / "curation"), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total"] == 2 and summary["removed"] == 1 and summary["removed_by_reason"] == {"blurry": 1}
    assert summary["report"] == str(tmp_path / "curation" / "quality_report.csv")
    assert (tmp_path / "curation" / "quality_report.csv").is_file()
    assert list((tmp_path / "cwd").iterdir()) == []  # nothing written into the working directory


# --- class balancing ---------------------------------------------------------------------------------------
def test_balance_by_augmentation_and_augment_copies():
    from monai.transforms import Compose, RandAffined

    items = [{"image": f"i{i}", "label": 0} for i in range(10)] + [{"image": f"j{i}", "label": 1} for i in range(3)]
    out = balance_by_augmentation(items, seed=0)
    counts = Counter(it["label"] for it in out)
    assert counts == {0: 10, 1: 10}
    copies = [it for it in out if it["aug_copy"] > 0]
    assert len(copies) == 7 and {it["label"] for it in copies} == {1}
    per_source = Counter(it["image"] for it in copies)
    assert max(per_source.values()) - min(per_source.values()) <= 1  # copies spread over the originals
    assert len(balance_by_augmentation(items, target_per_class=12)) == 24

    aug = AugmentCopiesd(
        keys="image",
        transform=Compose([RandAffined(keys="image", prob=1.0, rotate_range=0.3, padding_mode="zeros")]),
    )
    aug.set_random_state(0)
    img = torch.rand(1, 32, 32)
    original = aug({"image": img, "aug_copy": 0})
    assert torch.equal(original["image"], img)
    copy = aug({"image": img, "aug_copy": 1})
    assert copy["image"].shape == img.shape and not torch.allclose(torch.as_tensor(copy["image"]), img)


# --- bundle ------------------------------------------------------------------------------------------------
def test_committed_datalist_is_curated_and_split_by_patient():
    root = bundles_root() / BUNDLE
    with open(root / "configs" / "datalist.json") as f:
        dl = json.load(f)
    removed = {it["image"] for it in dl["curation"]["removed"]}
    kept = {it["image"] for p in ("training", "validation", "test") for it in dl[p]}
    assert removed and not removed & kept
    patients = [{it["patient"] for it in dl[p]} for p in ("training", "validation", "test")]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    # the curation record is honest: a removed image really fails the filter it names
    first = dl["curation"]["removed"][0]
    q = ImageQualityFilter().assess(load_xray(data_path("cxr", first["image"])))
    assert not q.passed and q.reasons == first["reasons"]


def test_samples_per_epoch_draws_a_random_subset_of_the_balanced_list():
    """``samples_per_epoch`` caps an epoch (the full balanced list is 3 x 2740 images) with a fresh random draw
    each epoch; without it an epoch is the whole list, shuffled."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundles_root() / BUNDLE / "configs" / "train.json"))
    parser.update({"data_root": str(data_path("cxr")), "train_limit": 4, "batch_size": 1, "num_workers": 0,
                   "samples_per_epoch": 4})
    loader = parser.get_parsed_content("train#dataloader")
    assert len(loader.dataset) == 6 and len(loader) == 4  # 4 images (2/1/1) balanced to 2 per class; 4 drawn
    draws = [[int(i) for i in loader.sampler] for _ in range(3)]
    assert all(len(set(d)) == 4 for d in draws) and len({tuple(d) for d in draws}) > 1
    parser["samples_per_epoch"] = None
    assert len(parser.get_parsed_content("train#dataloader", lazy=False)) == 6


def _run_inference(root, cfg_dir, data_root, n=6):
    from monai.bundle import run

    run(
        config_file=[str(cfg_dir / "inference.json")],
        meta_file=str(cfg_dir / "metadata.json"),
        logging_file=str(cfg_dir / "logging.conf"),
        bundle_root=str(root),
        data_root=str(data_root),
        num_workers=0,
        batch_size=3,
        datalist=f"$ctcovid.training.splits.load_parts(@datalist_file, 'test', @data_root, limit={n})",
    )
    with open(root / "predictions" / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_shipped_weights_predict_real_images(tmp_path):
    src = bundles_root() / BUNDLE
    if not (src / "models" / "model.pt").is_file():
        pytest.fail(f"{BUNDLE} ships models/model.pt; it is missing")
    root = tmp_path / BUNDLE
    shutil.copytree(src / "configs", root / "configs")
    shutil.copytree(src / "models", root / "models")
    rows = _run_inference(root, root / "configs", data_path("cxr"), n=9)
    assert len(rows) == 9 and {r["status"] for r in rows} == {"ok"}
    for r in rows:
        assert abs(sum(float(r[f"prob_{c}"]) for c in VBREATHNET_CLASSES) - 1) < 1e-4


@pytest.mark.slow
def test_bundle_short_training_writes_a_checkpoint_inference_loads(tmp_path):
    from monai.bundle import run

    data_root = data_path("cxr")
    root = tmp_path / BUNDLE
    shutil.copytree(bundles_root() / BUNDLE / "configs", root / "configs")
    (root / "models").mkdir()
    cfg = root / "configs"
    args = dict(
        config_file=[str(cfg / "train.json")],
        meta_file=str(cfg / "metadata.json"),
        logging_file=str(cfg / "logging.conf"),
        bundle_root=str(root),
        ckpt_dir=str(root / "models"),
        data_root=str(data_root),
        train_limit=12,
        val_limit=6,
        batch_size=6,
        num_workers=0,
    )
    run(epochs=1, **args)
    ckpt = root / "models" / "model.pt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(state) == set(VBreathNet().state_dict())
    # batch-norm statistics were estimated (re-estimated on the 2 training batches), not left at init values
    assert state["features.0.1.num_batches_tracked"] == 2
    assert not torch.allclose(state["features.0.1.running_var"], torch.ones(128))
    with open(root / "models" / "train_logs" / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
    assert (root / "models" / "checkpoint_checkpoint_epoch=1.pt").is_file()
    # a stopped run resumes: epoch 2 only, optimizer/schedule/trainer state from the epoch-1 checkpoint
    run(epochs=2, resume=True, **args)
    with open(root / "models" / "train_logs" / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    assert (root / "models" / "checkpoint_checkpoint_epoch=2.pt").is_file()
    rows = _run_inference(root, cfg, data_root)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}


def test_recompute_batchnorm_stats_is_the_plain_batch_average():
    from ctcovid.training.handlers.batchnorm import recompute_batchnorm_stats

    class Net(nn.Sequential):  # keeps its last batch norm frozen, as DETLNet does with its early layers
        def train(self, mode: bool = True):
            super().train(mode)
            self[4].eval()
            return self

    torch.manual_seed(0)
    net = Net(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)).train()
    frozen_before = net[4].running_mean.clone()
    net[1].running_mean.fill_(5.0)  # stale statistics
    batches = [{"image": torch.rand(3, 1, 8, 8)} for _ in range(3)]
    used = recompute_batchnorm_stats(net, batches, num_batches=2)
    assert used == 2
    with torch.no_grad():
        feats = torch.cat([net[0](b["image"]) for b in batches[:2]])
    assert torch.allclose(net[1].running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-5)
    assert net[1].momentum == 0.1 and net[2].training  # settings restored
    assert torch.equal(net[4].running_mean, frozen_before)
