"""SEME networks (SE + Moment Exchange), the MoEx and regional-learning losses, lung-only copies.

Networks run at batch 1 in eval/no_grad for the input-size checks (224 and 512) and at 32x32 for the
training-mode checks, which keeps this file at a few tens of seconds on 2 CPU cores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import data_path
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from monai.networks.blocks import ChannelSELayer
from timm.layers import SEModule

from ctcovid.io import load_xray
from ctcovid.losses import MoExCrossEntropyLoss, RegionalLearningLoss, regional_prepare_batch
from ctcovid.networks import MomentExchange, SEDenseNet169, SEResNet50, create_network
from ctcovid.transforms import LungRegiond

pytestmark = pytest.mark.usefixtures("no_weight_download")


def _ce_by_hand(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # -log softmax of the true class, averaged: written out so the test does not reuse F.cross_entropy
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -logp[torch.arange(len(y)), y].mean()


# ---------------------------------------------------------------- MomentExchange


def test_moex_exchanges_pono_moments_in_training():
    torch.manual_seed(3)
    x = torch.randn(6, 8, 5, 5) * torch.arange(1, 7).view(6, 1, 1, 1) + torch.arange(6).view(6, 1, 1, 1)
    moex = MomentExchange(p=1.0, lam=0.9).train()
    out = moex(x)
    assert moex.last_applied
    perm = moex.last_perm
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(6))
    assert perm.tolist() != list(range(6)), "seed 3 draws a non-identity permutation"
    # the output carries the partner's per-position channel moments ...
    np.testing.assert_allclose(out.mean(1), x[perm].mean(1), atol=1e-5)
    np.testing.assert_allclose(out.std(1, unbiased=False), x[perm].std(1, unbiased=False), rtol=1e-3, atol=1e-4)
    # ... and its own normalised pattern
    z = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True, unbiased=False)
    zo = (out - out.mean(1, keepdim=True)) / out.std(1, keepdim=True, unbiased=False)
    np.testing.assert_allclose(zo, z, atol=1e-3)
    moved = perm != torch.arange(6)
    assert not torch.allclose(out[moved], x[moved])


def test_moex_is_exact_identity_in_eval_and_for_single_samples():
    x = torch.randn(4, 8, 3, 3)
    moex = MomentExchange().eval()
    assert moex(x) is x and not moex.last_applied and moex.last_perm is None
    moex.train()
    assert moex(x[:1]) is not None and not moex.last_applied  # batch of one: nothing to exchange with
    assert MomentExchange(p=0.0).train()(x) is x
    with pytest.raises(ValueError):
        MomentExchange(p=1.5)


def test_moex_probability_is_honoured():
    torch.manual_seed(0)
    moex = MomentExchange(p=0.5).train()
    applied = 0
    for _ in range(200):
        moex(torch.randn(2, 4, 2, 2))
        applied += moex.last_applied
    assert 70 < applied < 130  # binomial(200, 0.5): +-4.2 sd


# ---------------------------------------------------------------- losses


def test_moex_loss_equals_hand_computed_lambda_mix():
    torch.manual_seed(1)
    moex = MomentExchange(lam=0.7).train()
    moex(torch.randn(5, 4, 2, 2))
    perm = moex.last_perm
    logits = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 1, 0])
    loss = MoExCrossEntropyLoss(moex)(logits, y)
    expected = 0.7 * _ce_by_hand(logits, y) + 0.3 * _ce_by_hand(logits, y[perm])
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6)
    # MONAI-style (B, 1) labels give the same value
    assert math.isclose(MoExCrossEntropyLoss(moex)(logits, y[:, None].float()).item(), loss.item(), rel_tol=1e-6)
    # class weights: weighted mean over each label set
    w = torch.tensor([1.0, 2.0, 0.5])
    lw = MoExCrossEntropyLoss(moex, weight=w)(logits, y)
    exp_w = 0.7 * F.cross_entropy(logits, y, weight=w) + 0.3 * F.cross_entropy(logits, y[perm], weight=w)
    assert math.isclose(lw.item(), exp_w.item(), rel_tol=1e-6)
    # no exchange (eval pass) -> plain cross-entropy
    moex.eval()
    moex(torch.randn(5, 4, 2, 2))
    assert math.isclose(MoExCrossEntropyLoss(moex)(logits, y).item(), _ce_by_hand(logits, y).item(), rel_tol=1e-6)
    assert math.isclose(MoExCrossEntropyLoss(None)(logits, y).item(), _ce_by_hand(logits, y).item(), rel_tol=1e-6)


def test_moex_loss_from_bundle_config_in_supervised_trainer():
    """``"moex": "$@network.moex"`` in a config; the trainer's loss is the lambda mix of its own output."""
    torch.manual_seed(0)
    config = {
        "imports": ["$import ctcovid.networks", "$import ctcovid.losses"],
        "network": {"_target_": "ctcovid.networks.SEResNet50", "in_channels": 1, "num_classes": 3},
        "loss": {"_target_": "ctcovid.losses.MoExCrossEntropyLoss", "moex": "$@network.moex"},
    }
    parser = ConfigParser(config)
    net, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    assert loss_fn.moex is net.moex
    with pytest.raises(TypeError, match="network.moex"):
        MoExCrossEntropyLoss("@network.moex")  # the unresolved string a bare reference leaves behind
    assert "moex" not in dict(loss_fn.named_modules())  # loss.train()/eval() must not flip the network's layer
    data = [{"image": torch.rand(1, 32, 32), "label": torch.tensor(i % 3)} for i in range(4)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=torch.utils.data.DataLoader(data, batch_size=4),
        network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_function=loss_fn, decollate=False,
    )
    trainer.run()
    out = trainer.state.output
    assert net.moex.last_applied
    y, pred, perm = out["label"].long(), out["pred"].detach(), net.moex.last_perm
    expected = 0.9 * _ce_by_hand(pred, y) + 0.1 * _ce_by_hand(pred, y[perm])
    assert math.isclose(out["loss"].item(), expected.item(), rel_tol=1e-5)


def test_regional_learning_loss_is_sum_of_two_cross_entropies():
    torch.manual_seed(2)
    logits = torch.randn(6, 3)
    y = torch.tensor([2, 0, 1])
    expected = _ce_by_hand(logits[:3], y) + _ce_by_hand(logits[3:], y)
    loss = RegionalLearningLoss()
    assert math.isclose(loss(logits, y).item(), expected.item(), rel_tol=1e-6)
    assert math.isclose(loss(logits, torch.cat([y, y])).item(), expected.item(), rel_tol=1e-6)
    with pytest.raises(ValueError):
        loss(logits[:5], y)


def test_regional_prepare_batch_and_trainer():
    img, lung = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    label = torch.tensor([1, 0])
    x, y = regional_prepare_batch({"image": img, "lung_image": lung, "label": label}, torch.device("cpu"))
    assert torch.equal(x, torch.cat([img, lung])) and y.tolist() == [1, 0, 1, 0]
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    data = [{"image": img[i], "lung_image": lung[i], "label": label[i]} for i in range(2)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=torch.utils.data.DataLoader(data, batch_size=2),
        network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_function=RegionalLearningLoss(),
        prepare_batch=regional_prepare_batch, decollate=False,
    )
    trainer.run()
    with torch.no_grad():
        logits = net(torch.cat([img, lung]))
    expected = _ce_by_hand(logits[:2], label) + _ce_by_hand(logits[2:], label)
    assert trainer.state.output["pred"].shape == (4, 2)
    assert math.isclose(trainer.state.output["loss"].item(), expected.item(), rel_tol=1e-5)


def test_lung_region_copy_on_real_image_and_manual_mask():
    root = data_path("cxr", "ieee8023")
    d = LungRegiond(keys="image", mask_key="lung_mask", output_key="lung_image")(
        {"image": load_xray(root / "images/02b76460.jpg"), "lung_mask": load_xray(root / "lung_masks/02b76460.png")}
    )
    img, mask, lung = d["image"], d["lung_mask"] > 0, d["lung_image"]
    assert lung.shape == img.shape and 0.05 < mask.float().mean() < 0.8
    assert torch.equal(lung[mask], img[mask])
    assert torch.all(lung[~mask] == img.min())
    assert torch.equal(d["image"], img)  # the original is kept


# ---------------------------------------------------------------- networks


@pytest.mark.parametrize("cls,n_se,se_type", [(SEResNet50, 16, SEModule), (SEDenseNet169, 4, ChannelSELayer)])
def test_se_networks_accept_224_and_512(cls, n_se, se_type):
    net = cls(in_channels=3, num_classes=3).eval()
    assert sum(isinstance(m, se_type) for m in net.modules()) == n_se  # one SE per fusion block
    assert net.gradcam_layer in dict(net.named_modules())
    with torch.no_grad():
        for size in (224, 512):
            out = net(torch.rand(1, 3, size, size))
            assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_networks_registered_and_moex_placement():
    net = create_network("seme_resnet50", in_channels=1, num_classes=3, moex_lam=0.8)
    assert isinstance(net, SEResNet50) and net.moex.lam == 0.8
    dense = create_network("seme_densenet169", in_channels=1, moex=False)
    assert isinstance(dense, SEDenseNet169) and dense.moex is None
    with pytest.raises(ValueError):
        SEResNet50(moex_layer="nope")
    # MoEx acts only in training mode: applied on a training batch, untouched at inference
    x = torch.rand(2, 1, 32, 32)
    net.train()(x)
    assert net.moex.last_applied and net.moex.last_perm.shape == (2,)
    net.eval()
    with torch.no_grad():
        net(x)
    assert not net.moex.last_applied


@pytest.mark.parametrize("cls", [SEResNet50, SEDenseNet169])
def test_he_uniform_initialisation(cls):
    net = cls(in_channels=3)
    weights = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.numel() > 50_000]
    assert len(weights) > 5
    for w in weights:
        fan_in = w[0].numel()
        bound = math.sqrt(6.0 / fan_in)  # kaiming_uniform_, ReLU gain: U(-b, b), std b / sqrt(3)
        assert w.abs().max().item() <= bound + 1e-6
        assert abs(w.std().item() / math.sqrt(2.0 / fan_in) - 1.0) < 0.05
        assert w.abs().max().item() > 0.95 * bound  # uniform fills the interval (a normal init would overflow it)
