"""CT networks: slice filter, lung segmenter, detection / severity members, ensembles, memberwise loss.

Sizes are reduced where the architecture allows it (Inception backbones need H, W >= 75); one test runs
the detection member at the paper's 64x224x224. Batch 1-2 keeps CPU time low.
"""

from __future__ import annotations

import pytest
import timm.models._builder
import torch
import torch.nn as nn
from monai.losses import FocalLoss

import ctcovid  # noqa: F401  (sets HF_HUB_OFFLINE)
from ctcovid.losses import MemberwiseLoss
from ctcovid.networks import (
    DetectionEnsemble,
    DetectionMember,
    LungSegmenter,
    LungSliceFilter,
    ProbabilityEnsemble,
    SeverityEnsemble,
    SeverityMember,
    create_network,
    list_networks,
)

pytestmark = pytest.mark.usefixtures("no_weight_download")


def state_dict_bytes(net: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())


@pytest.fixture(scope="module")
def severity_ensemble() -> SeverityEnsemble:
    return SeverityEnsemble(seed=0)  # the paper's 6 members, default sizes


def test_slice_filter_shapes():
    net = LungSliceFilter().eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, 64, 64)).shape == (2, 2)
        assert LungSliceFilter(in_channels=3, num_classes=3).eval()(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_lung_segmenter_shapes_and_size():
    net = LungSegmenter().eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, 64, 48)).shape == (2, 2, 64, 48)
    assert state_dict_bytes(net) < 25e6
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 1, 40, 40))
    # a MONAI AttentionUnet of the same configuration loads its weights: same state-dict keys
    from monai.networks.nets import AttentionUnet

    ref = AttentionUnet(2, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
    ref.load_state_dict(net.state_dict())


def test_detection_member_full_size():
    net = DetectionMember().eval()
    assert isinstance(net.backbone, timm.models.DenseNet)
    assert net.input_block.in_channels == 64 and net.input_block.out_channels == 3
    with torch.no_grad():
        assert net(torch.rand(1, 64, 224, 224)).shape == (1, 2)
    with pytest.raises(ValueError, match="64 slices"):
        net(torch.rand(1, 32, 224, 224))


def test_severity_member_inputs_and_single_output(severity_ensemble):
    net = severity_ensemble.members[0]  # an inception_v3 member (reused: Inception init costs seconds)
    assert isinstance(net, SeverityMember) and isinstance(net.backbone, timm.models.InceptionV3)
    x = torch.rand(2, 48, 75, 75)  # 75 x 75 is the smallest size the Inception backbones accept
    net.train()
    try:
        with torch.no_grad():
            out = net(x)
    finally:
        net.eval()
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4)  # no auxiliary logits in training
    with torch.no_grad():
        joined = net(x)
        split = net(x[:, :32], x[:, 32:])
    assert joined.shape == (2, 4)
    torch.testing.assert_close(joined, split)
    with pytest.raises(ValueError, match="32 \\+ 16"):
        net(torch.rand(1, 40, 75, 75))


def test_severity_ensemble_six_members(severity_ensemble):
    ens = severity_ensemble
    assert ens.num_members == 6
    assert ens.backbone_names == ("inception_v3",) * 2 + ("inception_v4",) * 2 + ("inception_resnet_v2",) * 2
    kinds = (
        (timm.models.InceptionV3,) * 2 + (timm.models.InceptionV4,) * 2 + (timm.models.InceptionResnetV2,) * 2
    )
    assert all(isinstance(m.backbone, kind) for m, kind in zip(ens.members, kinds))
    x = torch.rand(1, 48, 75, 75)
    ens.eval()
    with torch.no_grad():
        probs = ens(x)
        per_member = torch.stack([torch.softmax(m(x), dim=1) for m in ens.members], dim=1)
    assert probs.shape == (1, 4)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1))
    torch.testing.assert_close(probs, per_member.mean(dim=1))


def test_ensemble_eval_is_mean_softmax_and_training_stacks_logits():
    torch.manual_seed(0)
    # the ensemble mechanics do not depend on the backbone: a cheap one keeps this test fast
    # (DenseNet-161 members are run in test_detection_member_full_size, Inception ones below)
    ens = DetectionEnsemble(num_members=3, in_slices=8, backbone="resnet18")
    x = torch.rand(2, 8, 32, 32)
    ens.eval()
    with torch.no_grad():
        logits = torch.stack([m(x) for m in ens.members], dim=1)
        probs = ens(x)
        mean, spread = ens.predict_with_spread(x)
    expected = torch.softmax(logits, dim=2).mean(dim=1)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(mean, expected)
    torch.testing.assert_close(spread, torch.softmax(logits, dim=2).std(dim=1, correction=0))
    assert not torch.allclose(logits[:, 0], logits[:, 1])  # members are initialised differently
    ens.train()
    stacked = ens(x)
    assert stacked.shape == (2, 3, 2) and stacked.requires_grad


def test_ensemble_seed_reproducible_and_any_member_count():
    a = DetectionEnsemble(num_members=2, in_slices=4, backbone="resnet18", seed=7)
    b = DetectionEnsemble(num_members=2, in_slices=4, backbone="resnet18", seed=7)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    w0, w1 = (m.input_block.weight for m in a.members)
    assert not torch.equal(w0, w1)
    single = ProbabilityEnsemble([nn.Linear(5, 3)]).eval()
    mean, spread = single.predict_with_spread(torch.rand(4, 5))
    torch.testing.assert_close(spread, torch.zeros(4, 3))
    with pytest.raises(ValueError):
        ProbabilityEnsemble([])


def test_memberwise_loss_is_mean_of_member_cross_entropies():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 5, requires_grad=True)  # B=4, M=3, C=5
    target = torch.tensor([0, 4, 2, 2])
    loss = MemberwiseLoss(nn.CrossEntropyLoss())(logits, target)
    # by hand: -log softmax of the target class, mean over the batch, then over members
    log_p = logits.detach() - logits.detach().exp().sum(dim=2, keepdim=True).log()
    per_member = torch.stack([-log_p[torch.arange(4), m, target].mean() for m in range(3)])
    torch.testing.assert_close(loss.detach(), per_member.mean())
    loss.backward()
    assert logits.grad.abs().sum(dim=(0, 2)).gt(0).all()  # every member receives a gradient
    # (B, C) input: plain loss
    torch.testing.assert_close(
        MemberwiseLoss(nn.CrossEntropyLoss())(logits[:, 1], target),
        nn.CrossEntropyLoss()(logits[:, 1], target),
    )
    with pytest.raises(ValueError):
        MemberwiseLoss(nn.CrossEntropyLoss())(logits[None], target)


def test_memberwise_loss_with_monai_focal_loss():
    torch.manual_seed(1)
    logits = torch.randn(4, 3, 5)
    target = torch.tensor([0, 4, 2, 2])
    ce = MemberwiseLoss(nn.CrossEntropyLoss())(logits, target)
    # MONAI softmax focal loss with gamma 0 is cross-entropy averaged over batch AND classes: CE / C
    focal0 = MemberwiseLoss(FocalLoss(gamma=0.0, use_softmax=True, to_onehot_y=True))(logits, target[:, None])
    torch.testing.assert_close(focal0, ce / 5)
    focal = MemberwiseLoss(FocalLoss(gamma=2.0, use_softmax=True, to_onehot_y=True))
    by_member = torch.stack(
        [
            FocalLoss(gamma=2.0, use_softmax=True, to_onehot_y=True)(logits[:, m], target[:, None])
            for m in range(3)
        ]
    )
    torch.testing.assert_close(focal(logits, target[:, None]), by_member.mean())
    assert focal(logits, target[:, None]) < focal0  # focusing down-weights easy examples


def test_registry_builds_each_network():
    expected = {
        "lung_slice_filter": ({}, LungSliceFilter),
        "lung_segmenter": ({"channels": (4, 8, 16), "strides": (2, 2)}, LungSegmenter),
        "ct_detection_member": ({"in_slices": 4, "backbone": "resnet18"}, DetectionMember),
        "ct_severity_member": ({"slices_a": 4, "slices_b": 2, "backbone": "resnet18"}, SeverityMember),
        "ct_detection_ensemble": (
            {"num_members": 2, "in_slices": 4, "backbone": "resnet18"},
            DetectionEnsemble,
        ),
        "ct_severity_ensemble": (
            {"backbones": ["resnet18"], "repeats": 2, "slices_a": 4, "slices_b": 2},
            SeverityEnsemble,
        ),
    }
    assert set(expected) <= set(list_networks())
    for name, (kwargs, cls) in expected.items():
        assert isinstance(create_network(name, **kwargs), cls), name
