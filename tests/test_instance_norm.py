"""Instance norms run as group norms: same outputs, same state dict, running-stat norms left alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from monai.networks.nets import UNet

from ctcovid.networks import LungSegmenter, instance_norms_as_group_norms


def _count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.mark.parametrize("training", [False, True])
def test_monai_networks_compute_the_same_after_the_swap(training):
    torch.manual_seed(0)
    nets = [
        LungSegmenter(channels=(8, 16, 32, 64, 128)),  # MONAI UpConv: 4 instance norms
        UNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1),  # instance norms throughout
    ]
    x = torch.rand(3, 1, 64, 64)
    for net in nets:
        net.train(training)
        before = _count(net, nn.InstanceNorm2d)
        assert before > 0
        swapped = copy.deepcopy(net)
        assert instance_norms_as_group_norms(swapped) == before
        assert _count(swapped, nn.InstanceNorm2d) == 0 and _count(swapped, nn.GroupNorm) == before
        assert swapped.training == training
        with torch.no_grad():
            torch.testing.assert_close(swapped(x), net(x), atol=2e-5, rtol=1e-5)
        # the state dict is the same: weights saved from either load into the other
        assert swapped.state_dict().keys() == net.state_dict().keys()
        swapped.load_state_dict(net.state_dict(), strict=True)


def test_affine_weights_are_kept_and_running_stat_norms_left_alone():
    torch.manual_seed(1)
    affine = nn.InstanceNorm2d(6, affine=True, eps=1e-3)
    with torch.no_grad():
        affine.weight.uniform_(0.5, 2.0)
        affine.bias.uniform_(-1.0, 1.0)
    tracked = nn.InstanceNorm2d(6, track_running_stats=True)
    tracked.running_mean.fill_(0.3)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), affine, nn.Conv2d(6, 6, 1), tracked).eval()
    ref = copy.deepcopy(model)
    assert instance_norms_as_group_norms(model) == 1
    assert isinstance(model[1], nn.GroupNorm) and model[1].eps == 1e-3 and model[1].num_groups == 6
    assert isinstance(model[3], nn.InstanceNorm2d)  # eval uses its running stats
    x = torch.randn(2, 2, 20, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=2e-5, rtol=1e-5)
