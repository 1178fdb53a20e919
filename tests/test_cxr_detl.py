"""Domain-extension transfer learning: head replacement, freezing, patient-level k-fold splits, the k-fold
summary, and the cxr_detl_classification bundle (stage A -> stage B -> inference, k-fold evaluate) on real data."""

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

from ctcovid.bundle import bundles_root
from ctcovid.cxr.datasets import detl_items, patient_kfold
from ctcovid.io.errors import CheckpointMismatchError
from ctcovid.networks import DETL_TARGET_CLASSES, DETLNet
from ctcovid.training.kfold import summarize_folds

BUNDLE = "cxr_detl_classification"


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("arch", ["alexnet", "resnet50"])
def test_freezing_really_freezes(arch):
    """Stage B: after an SGD step, every parameter (and BN statistic) before the last conv block is unchanged,
    while the last block and the new head moved."""
    torch.manual_seed(0)
    stage_a = DETLNet(arch, in_channels=1, num_classes=2)
    # what source_checkpoint= does (exercised from a file in the bundle test), without a 100-200 MB file here
    net = DETLNet(arch, in_channels=1, num_classes=2)
    net.load_state_dict(stage_a.state_dict())
    net.replace_head(4)
    net.freeze_until_last_block()
    assert net.head.out_features == 4 and net.num_classes == 4
    frozen_ids = {id(p) for m in net.frozen_modules() for p in m.parameters()}
    trainable = list(net.trainable_parameters())
    assert frozen_ids and not frozen_ids & {id(p) for p in trainable}
    assert {id(p) for p in net.last_block().parameters()} <= {id(p) for p in trainable}
    # stage-A weights were carried over (all but the head)
    sd_a = stage_a.state_dict()
    for k, v in net.state_dict().items():
        if k in sd_a and v.shape == sd_a[k].shape and "classifier.6" not in k and not k.startswith("net.fc"):
            assert torch.equal(v, sd_a[k]), k

    before = _snapshot(net)
    opt = torch.optim.SGD(trainable, lr=1e-2, momentum=0.9)
    net.train()
    size = 64 if arch == "alexnet" else 32  # AlexNet needs >= 63 pixels
    x = torch.rand(4, 1, size, size)
    y = torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    after = net.state_dict()
    frozen_names = {n for n, p in net.named_parameters() if not p.requires_grad}
    frozen_prefixes = tuple(n.rsplit(".", 1)[0] + "." for n in frozen_names)
    for k in before:
        if k in frozen_names or (k.startswith(frozen_prefixes) and "running" in k):
            assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    head_keys = [k for k in before if k.startswith("net.fc.") or k.startswith("net.classifier.6.")]
    assert head_keys and all(not torch.equal(before[k], after[k]) for k in head_keys if "weight" in k)
    last = [f"net.{n}" for n, _ in net.net.named_parameters() if n.startswith(("layer4.", "features.10."))]
    assert last and any(not torch.equal(before[k], after[k]) for k in last)


def test_vgg16_freezes_up_to_conv5():
    net = DETLNet("vgg16", in_channels=1, num_classes=4, freeze=True)
    convs = [m for m in net.net.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert [c.weight.requires_grad for c in convs] == [False] * 10 + [True] * 3  # conv5_1..conv5_3 train
    assert all(p.requires_grad for p in net.net.classifier.parameters())


def test_stage_a_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train stage A first"):
        DETLNet("alexnet", num_classes=4, source_checkpoint=tmp_path / "none.pt")
    bad = tmp_path / "other.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 8)}}, bad)  # a CheckpointSaver file of another network
    with pytest.raises(CheckpointMismatchError, match=r"other\.pt.*alexnet"):
        DETLNet("alexnet", num_classes=4, source_checkpoint=bad)
    with pytest.raises(ValueError, match="arch"):
        DETLNet("inception")


def test_patient_kfold_never_splits_a_patient():
    items = detl_items(data_path("cxr"))
    folds = patient_kfold(items, k=5, seed=0)
    owner: dict[str, int] = {}
    for i, fold in enumerate(folds):
        for it in fold:
            assert owner.setdefault(it["patient"], i) == i, f"patient {it['patient']} in folds {owner[it['patient']]} and {i}"
    assert sorted(it["image"] for f in folds for it in f) == sorted(it["image"] for it in items)
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 0.05 * len(items)
    for f in folds:  # stratified: every class in every fold
        assert set(Counter(it["label"] for it in f)) == set(range(len(DETL_TARGET_CLASSES)))
    # multi-image patients exist, so the test can fail if splitting went by image
    assert max(Counter(it["patient"] for it in items).values()) > 1
    with pytest.raises(ValueError):
        patient_kfold(items, k=1)


def test_committed_datalist_keeps_stage_a_away_from_the_folds():
    with open(bundles_root() / BUNDLE / "configs" / "datalist.json") as f:
        dl = json.load(f)
    stage_a = {it["patient"] for p in ("stage_a_training", "stage_a_validation") for it in dl[p]}
    folds = [{it["patient"] for it in dl[f"fold{i}"]} for i in range(5)]
    for i, fi in enumerate(folds):
        assert not fi & stage_a
        for fj in folds[i + 1 :]:
            assert not fi & fj
    assert dl["class_names"] == list(DETL_TARGET_CLASSES)
    totals = Counter()
    for i in range(5):
        totals.update(dl["counts"][f"fold{i}"]["images"])
    assert totals["other disease"] == 48 and totals["COVID-19"] == 297  # mapping documented in the README


def test_summarize_folds_matches_numpy():
    names = ["a", "b"]
    r1 = {"accuracy": 0.75, "confusion_matrix": [[2, 1], [0, 1]],
          "scans": [{"label": "a", "probabilities": [0.9, 0.1]}, {"label": "a", "probabilities": [0.8, 0.2]},
                    {"label": "a", "probabilities": [0.3, 0.7]}, {"label": "b", "probabilities": [0.2, 0.8]}]}
    r2 = {"accuracy": 0.5, "confusion_matrix": [[1, 0], [1, 0]],
          "scans": [{"label": "a", "probabilities": [0.6, 0.4]}, {"label": "b", "probabilities": [0.7, 0.3]}]}
    s = summarize_folds([r1, r2], names)
    assert s["accuracy_mean"] == pytest.approx(0.625)
    assert s["accuracy_std"] == pytest.approx(np.std([0.75, 0.5], ddof=1))
    assert s["confusion_matrix_summed"] == [[3, 1], [1, 1]]
    assert s["pooled"]["num_samples"] == 6 and s["pooled"]["accuracy"] == pytest.approx(4 / 6)


@pytest.mark.slow
def test_bundle_stage_a_stage_b_inference_and_kfold(tmp_path):
    """Real tiny runs: stage A writes stage_a.pt, stage B loads it and writes model.pt, inference loads that
    and predicts real images, and the k-fold evaluate workflow reports mean/std accuracy and the summed
    confusion matrix over the folds it ran."""
    from monai.bundle import run

    data_root = data_path("cxr")
    src = bundles_root() / BUNDLE
    root = tmp_path / BUNDLE
    shutil.copytree(src / "configs", root / "configs")
    (root / "models").mkdir()
    cfg = root / "configs"
    common = {
        "bundle_root": str(root),
        "data_root": str(data_root),
        "spatial_size": [64, 64],
        "num_workers": 0,
        "batch_size": 8,
        "meta_file": str(cfg / "metadata.json"),
        "logging_file": str(cfg / "logging.conf"),
    }
    run(config_file=[str(cfg / "train.json"), str(cfg / "train_stage_a.json")], epochs=1, train_limit=16,
        val_limit=8, **common)
    stage_a = root / "models" / "stage_a.pt"
    assert stage_a.is_file()
    sd_a = torch.load(stage_a, map_location="cpu", weights_only=True)
    assert sd_a["net.classifier.6.weight"].shape[0] == 2

    run(config_file=[str(cfg / "train.json")], epochs=1, train_limit=16, val_limit=8, **common)
    sd_b = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert sd_b["net.classifier.6.weight"].shape[0] == 4
    assert torch.equal(sd_b["net.features.0.weight"], sd_a["net.features.0.weight"])  # frozen: unchanged
    assert not torch.equal(sd_b["net.features.10.weight"], sd_a["net.features.10.weight"])  # last block trained

    run(config_file=[str(cfg / "inference.json")], batch_size=4,
        datalist="$ctcovid.training.splits.load_parts(@datalist_file, 'fold0', @data_root, limit=8)",
        **{k: v for k, v in common.items() if k != "batch_size"})
    with open(root / "predictions" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert all(abs(sum(float(r[f"prob_{c}"]) for c in DETL_TARGET_CLASSES) - 1) < 1e-4 for r in rows)

    run(config_file=[str(cfg / "train.json"), str(cfg / "evaluate.json")], kfold_epochs=1,
        kfold_train_limit=12, kfold_eval_limit=8, kfold_run_folds=[0, 1], **common)
    with open(root / "eval_kfold" / "kfold_report.json") as f:
        rep = json.load(f)
    folds = []
    for i in (0, 1):
        with open(root / "eval_kfold" / f"fold{i}" / "report.json") as f:
            folds.append(json.load(f))
    assert rep["folds"] == 2 and rep["folds_run"] == [0, 1]
    assert rep["fold_accuracy"] == pytest.approx([r["accuracy"] for r in folds], abs=1e-6)
    assert rep["accuracy_mean"] == pytest.approx(np.mean([r["accuracy"] for r in folds]))
    assert rep["accuracy_std"] == pytest.approx(np.std([r["accuracy"] for r in folds], ddof=1))
    summed = np.sum([np.asarray(r["confusion_matrix"]) for r in folds], axis=0)
    assert rep["confusion_matrix_summed"] == summed.tolist() and summed.sum() == 16
    # no image is held out twice
    held = [{s["name"] for s in r["scans"]} for r in folds]
    assert not held[0] & held[1]
    assert (root / "eval_kfold" / "kfold_confusion_matrix.png").is_file()
