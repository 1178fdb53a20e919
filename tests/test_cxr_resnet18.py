"""ResNet-18 / CBAM-ResNet-18 chest X-ray classifier: attention modules, initialisation, local checkpoints,
side-by-side Grad-CAM, and the cxr_covid_resnet18_classification bundle on real radiographs."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import data_path
from PIL import Image

from ctcovid.bundle import bundles_root
from ctcovid.io.errors import CheckpointMismatchError, CorruptFileError
from ctcovid.networks import CBAM, ChannelAttention, ResNet18Classifier, SpatialAttention, create_network
from ctcovid.networks.resnet18 import load_resnet18_checkpoint

BUNDLE = "cxr_covid_resnet18_classification"


# --- attention modules ---------------------------------------------------------------------------------
def test_channel_attention_weights_in_unit_interval_and_rescale_channels():
    torch.manual_seed(0)
    ca = ChannelAttention(32, reduction=8)
    x = torch.randn(3, 32, 9, 11)
    w = ca.attention(x)
    assert w.shape == (3, 32, 1, 1)
    assert torch.all(w > 0) and torch.all(w < 1)
    y = ca(x)
    # every channel is one scaled copy of its input: y / x is constant over space, equal to the weight
    ratio = y / x
    assert torch.allclose(ratio, w.expand_as(ratio), atol=1e-5)
    # the weights depend on the input (max- and average-pooled descriptors), not a fixed gate
    assert not torch.allclose(ca.attention(2 * x + 1), w)


def test_channel_attention_uses_both_max_and_average_pooling():
    ca = ChannelAttention(4, reduction=2)
    a = torch.zeros(1, 4, 4, 4)
    b = a.clone()
    b[0, :, 0, 0] = 8.0  # same mean per channel as c below, different max
    c = torch.full((1, 4, 4, 4), 0.5)
    assert torch.allclose(b.mean(dim=(2, 3)), c.mean(dim=(2, 3)))
    assert not torch.allclose(ca.attention(b), ca.attention(c))  # max pooling sees the difference


def test_spatial_attention_map_shape_and_rescale():
    torch.manual_seed(0)
    sa = SpatialAttention(7)
    x = torch.randn(2, 16, 13, 17)
    m = sa.attention(x)
    assert m.shape == (2, 1, 13, 17)
    assert torch.all(m > 0) and torch.all(m < 1)
    assert torch.allclose(sa(x), x * m, atol=1e-6)
    assert sa.conv.kernel_size == (7, 7) and sa.conv.in_channels == 2  # channel-wise mean and max
    with pytest.raises(ValueError):
        SpatialAttention(6)


def test_cbam_changes_features_and_gradients_flow():
    torch.manual_seed(0)
    cbam = CBAM(24, reduction=4)
    x = torch.randn(2, 24, 10, 10, requires_grad=True)
    y = cbam(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, x)
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in cbam.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


# --- ResNet-18 classifier ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cbam", [False, True])
def test_resnet18_shapes_and_cbam_positions(cbam):
    net = ResNet18Classifier(in_channels=1, num_classes=3, cbam=cbam).eval()
    seen = {}
    if cbam:
        net.cbam_stem.register_forward_hook(lambda m, i, o: seen.__setitem__("stem", tuple(i[0].shape)))
        net.cbam_out.register_forward_hook(lambda m, i, o: seen.__setitem__("out", tuple(i[0].shape)))
    with torch.no_grad():
        assert net(torch.rand(2, 1, 224, 224)).shape == (2, 3)
        assert net(torch.rand(1, 1, 96, 128)).shape == (1, 3)
    if cbam:
        assert isinstance(net.cbam_stem, CBAM) and isinstance(net.cbam_out, CBAM)
        assert seen == {"stem": (1, 64, 48, 64), "out": (1, 512, 3, 4)}  # after conv1 (1/2), after layer4 (1/32)
        assert net.gradcam_layer == "cbam_out"
    else:
        assert isinstance(net.cbam_stem, nn.Identity) and isinstance(net.cbam_out, nn.Identity)
        assert net.gradcam_layer == "backbone.layer4"


def test_registry_names_and_parameter_counts():
    plain = create_network("resnet18_classifier", num_classes=2)
    att = create_network("cbam_resnet18_classifier", num_classes=2)
    n_plain = sum(p.numel() for p in plain.parameters())
    n_att = sum(p.numel() for p in att.parameters())
    # CBAM adds two MLPs (64->4->64, 512->32->512, with biases) and two 2->1 7x7 convolutions
    expected_extra = (64 * 4 + 4 + 4 * 64 + 64) + (512 * 32 + 32 + 32 * 512 + 512) + 2 * (2 * 49)
    assert n_att - n_plain == expected_extra


def test_kaiming_initialisation_by_default():
    torch.manual_seed(0)
    net = ResNet18Classifier(in_channels=1, num_classes=2, cbam=True)
    w = net.backbone.layer3[0].conv1.weight  # 256 x 128 x 3 x 3
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert abs(float(w.std()) - np.sqrt(2.0 / fan_out)) / np.sqrt(2.0 / fan_out) < 0.05
    assert torch.all(net.backbone.bn1.weight == 1) and torch.all(net.backbone.fc.bias == 0)


def test_local_pretrained_checkpoint(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    tv = resnet18(weights=None)  # a stand-in for an ImageNet checkpoint: 3 channels, 1000 classes
    ckpt = tmp_path / "resnet18_local.pth"
    torch.save(tv.state_dict(), ckpt)
    net = ResNet18Classifier(in_channels=1, num_classes=2, cbam=True)
    report = load_resnet18_checkpoint(net, ckpt)
    assert report["head_reset"] == ["backbone.fc.weight", "backbone.fc.bias"]
    assert report["conv1_adapted"] == ["backbone.conv1.weight"]
    assert report["attention_init"]  # CBAM is not in a plain ResNet checkpoint
    assert torch.equal(net.backbone.layer2[1].conv2.weight, tv.layer2[1].conv2.weight)
    assert torch.allclose(net.backbone.conv1.weight, tv.conv1.weight.sum(dim=1, keepdim=True))
    # a grey image through the summed conv1 equals the RGB replica through the original conv1
    g = torch.rand(1, 1, 32, 32)
    assert torch.allclose(net.backbone.conv1(g), tv.conv1(g.repeat(1, 3, 1, 1)), atol=1e-5)

    # the constructor argument does the same; wrapped and DDP-prefixed checkpoints load too
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, wrapped)
    net2 = ResNet18Classifier(in_channels=1, num_classes=2, pretrained_path=wrapped)
    assert torch.equal(net2.backbone.layer4[0].conv1.weight, tv.layer4[0].conv1.weight)

    with pytest.raises(FileNotFoundError, match="never downloaded"):
        ResNet18Classifier(pretrained_path=tmp_path / "absent.pth")
    # a deeper ResNet: extra blocks (unexpected keys) and, here, a missing one
    other_sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("layer4.1.")}
    other_sd["layer1.2.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    other = tmp_path / "resnet_other.pth"
    torch.save(other_sd, other)
    with pytest.raises(CheckpointMismatchError, match=r"resnet_other\.pth.*missing keys.*layer4\.1.*unexpected keys"):
        ResNet18Classifier(pretrained_path=other)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptFileError, match="junk.pth"):
        ResNet18Classifier(pretrained_path=junk)


# --- Grad-CAM side by side ---------------------------------------------------------------------------------
def test_gradcam_side_by_side_png(tmp_path):
    from ctcovid.io import load_xray
    from ctcovid.visualize.gradcam_compare import save_gradcam_comparison

    img = load_xray(data_path("cxr", "kermany", "train", "NORMAL", "IM-0115-0001.jpeg"))
    x = torch.nn.functional.interpolate(img.as_tensor()[None], size=(64, 64), mode="bilinear")[0]
    torch.manual_seed(0)
    nets = {"ResNet18": ResNet18Classifier(cbam=False), "CBAM-ResNet18": ResNet18Classifier(cbam=True)}
    out = save_gradcam_comparison(x, nets, tmp_path / "cmp.png", class_names=["normal", "COVID-19"])
    arr = np.asarray(Image.open(out["path"]))
    assert arr.ndim == 3 and arr.shape[2] == 3
    assert arr.shape[1] == 3 * 64 + 2 * 4  # input + two overlays, 4 px gaps
    assert out["networks"]["CBAM-ResNet18"]["layer"] == "cbam_out"
    assert out["networks"]["ResNet18"]["layer"] == "backbone.layer4"
    assert arr.shape[0] == 64 + 26  # title strip above the panels
    left, right = arr[26:, 68:132], arr[26:, 136:200]
    assert not np.array_equal(left, right)  # two different heat maps
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, no temporary left over


# --- bundle ------------------------------------------------------------------------------------------------
def _bundle_copy(tmp_path):
    src = bundles_root() / BUNDLE
    dst = tmp_path / BUNDLE
    shutil.copytree(src / "configs", dst / "configs")
    (dst / "models").mkdir()
    return dst


def test_committed_datalist_is_patient_level_and_reproducible():
    from ctcovid.cxr.datasets import build_resnet18_datalist

    with open(bundles_root() / BUNDLE / "configs" / "datalist.json") as f:
        dl = json.load(f)
    rebuilt = build_resnet18_datalist(data_path("cxr"))
    for part in ("training", "validation", "test"):
        assert [it["image"] for it in dl[part]] == [it["image"] for it in rebuilt[part]]
    patients = [{it["patient"] for it in dl[p]} for p in ("training", "validation", "test")]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    for part in ("training", "validation", "test"):
        assert set(dl["counts"][part]["images"].values()) and min(dl["counts"][part]["images"].values()) > 0
        # adults without COVID-19 in every part: the network cannot tell COVID-19 by the patient's age alone
        assert dl["domains"][part]["adult/non-COVID-19"] >= 9
        assert {it["domain"] for it in dl[part] if it["label"] == 1} == {"adult"}


def test_adult_probe_holds_only_adults_no_training_patient_saw():
    from ctcovid.cxr.datasets import adult_probe_items

    with open(bundles_root() / BUNDLE / "configs" / "datalist.json") as f:
        dl = json.load(f)
    probe = adult_probe_items(data_path("cxr"), dl, covid_class=1)
    seen = {it["patient"] for p in ("training", "validation") for it in dl[p]}
    assert probe and all(it["image"].startswith("ieee8023/") for it in probe)
    assert not {it["patient"] for it in probe} & seen
    assert {it["group"] for it in probe if it["covid"]} == {"covid"}
    assert {it["group"] for it in probe if not it["covid"]} <= {"normal", "other"}
    # every test-split adult is in it; with the adult negatives listed in the datalist there is nothing else
    assert {it["image"] for it in probe} == {it["image"] for it in dl["test"] if it["domain"] == "adult"}
    # against the paper's normal-vs-COVID-19 list (no adult negatives listed) it adds the unlisted adult films
    paper = {**dl, "test": [it for it in dl["test"] if it["label"] == 1]}
    extra = adult_probe_items(data_path("cxr"), paper, covid_class=1)
    assert len(extra) > len([it for it in paper["test"]]) and not any(it["covid"] for it in extra[len(paper["test"]):])


def test_adult_probe_summary_counts_by_hand():
    """The benchmark's numbers on a hand-made probe: 4 COVID-19 films (3 called), 3 others (1 called)."""
    import sys

    sys.path.insert(0, str(bundles_root().parent / "benchmarks"))
    from cxr_covid_resnet18_adult_eval import binary_summary

    y = np.array([1, 1, 1, 1, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1])
    out = binary_summary(y, p, ["a", "a", "b", "c", "d", "e", "f"])
    assert (out["covid19"], out["not_covid19"], out["patients"]) == (4, 3, 6)
    assert out["sensitivity"] == 0.75 and out["specificity"] == pytest.approx(0.6667, abs=1e-4)
    assert out["accuracy"] == pytest.approx(5 / 7, abs=1e-4)
    assert out["auc"] == pytest.approx(10 / 12, abs=1e-4)  # 10 of the 12 positive-negative pairs ordered right
    low, high = out["sensitivity_ci95"]
    assert low < 0.75 < high



@pytest.mark.slow
def test_bundle_short_training_then_inference_and_gradcam(tmp_path):
    """A real (tiny) training of the CBAM variant writes model_cbam.pt and resumes where it stopped; the
    inference config loads it and predicts real radiographs; the Grad-CAM config writes side-by-side overlays
    for both variants."""
    from monai.bundle import run

    data_root = data_path("cxr")
    root = _bundle_copy(tmp_path)
    cfg = root / "configs"
    common = {"bundle_root": str(root), "data_root": str(data_root), "spatial_size": [64, 64], "num_workers": 0}
    train_args = dict(
        config_file=[str(cfg / "train.json")],
        meta_file=str(cfg / "metadata.json"),
        logging_file=str(cfg / "logging.conf"),
        ckpt_dir=str(root / "models"),
        use_cbam=True,
        train_limit=16,
        val_limit=8,
        batch_size=8,
        **common,
    )
    run(epochs=1, **train_args)
    ckpt = root / "models" / "model_cbam.pt"
    assert ckpt.is_file() and not (root / "models" / "model.pt").exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert "cbam_out.channel.mlp.0.weight" in state
    # a stopped run resumes at epoch 2 from the epoch-1 checkpoint (optimizer, schedule, trainer state)
    run(epochs=2, resume=True, **train_args)
    with open(root / "models" / "train_logs" / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    assert (root / "models" / "checkpoint_checkpoint_epoch=2.pt").is_file()

    run(
        config_file=[str(cfg / "inference.json")],
        meta_file=str(cfg / "metadata.json"),
        logging_file=str(cfg / "logging.conf"),
        use_cbam=True,
        datalist="$ctcovid.training.splits.load_parts(@datalist_file, 'test', @data_root, limit=6)",
        batch_size=3,
        **common,
    )
    with open(root / "predictions" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        p = [float(r["prob_non-COVID-19"]), float(r["prob_COVID-19"])]
        assert abs(sum(p) - 1) < 1e-4 and r["predicted_class"] in ("non-COVID-19", "COVID-19")
        assert r["image"].startswith(str(data_root))

    # Grad-CAM comparison: the plain variant's checkpoint is an untrained state dict (the overlay layout is
    # under test here, not its quality); the CBAM one is the checkpoint trained above.
    torch.save(ResNet18Classifier(in_channels=1, num_classes=2).state_dict(), root / "models" / "model.pt")
    run(
        config_file=[str(cfg / "inference.json"), str(cfg / "gradcam.json")],
        meta_file=str(cfg / "metadata.json"),
        logging_file=str(cfg / "logging.conf"),
        gradcam_limit=2,
        **common,
    )
    pngs = sorted((root / "gradcam").glob("*_gradcam.png"))
    assert len(pngs) == 2
    assert np.asarray(Image.open(pngs[0])).shape[1] == 3 * 64 + 2 * 4
