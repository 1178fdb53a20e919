"""Folding eval-mode batch norms into convolutions (:func:`ctcovid.networks.fold_batchnorm`)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import ctcovid  # noqa: F401  (sets HF_HUB_OFFLINE)
from ctcovid.networks import LungSegmenter, LungSliceFilter, fold_batchnorm
from ctcovid.networks.batchnorm_folding import conv_bn_pairs


def _randomise_batchnorms(net: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return net.eval()


class _Branchy(nn.Module):
    """conv->bn (foldable), a conv whose raw output is also used elsewhere, and a bn after an addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.bn_sum = nn.BatchNorm2d(4)

    def forward(self, x):
        a = torch.relu(self.bn_a(self.conv_a(x)))
        b = self.conv_b(a)
        return self.bn_sum(self.bn_b(b) + b)  # conv_b's output is read twice: not foldable


def test_folds_only_what_is_exact_and_keeps_the_function():
    net = _randomise_batchnorms(_Branchy())
    assert conv_bn_pairs(net) == [["conv_a", "bn_a"]]
    x = torch.randn(2, 3, 9, 7)
    ref = net(x).detach()
    assert fold_batchnorm(net) == 1
    assert isinstance(net.bn_a, nn.Identity)
    assert isinstance(net.bn_b, nn.BatchNorm2d) and isinstance(net.bn_sum, nn.BatchNorm2d)
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, size, expected", [(LungSliceFilter, 64, 53), (LungSegmenter, 64, 22)])
def test_slice_level_networks_fold_and_compute_the_same(make, size, expected):
    """The pipeline's slice filter (ResNeXt-50: every batch norm) and segmenter (the traceable Attention
    U-Net inside its size check) give the same outputs folded."""
    torch.manual_seed(0)
    net = _randomise_batchnorms(make())
    ref_net = copy.deepcopy(net)
    x = torch.rand(2, 1, size, size)
    assert fold_batchnorm(net) == expected
    with torch.no_grad():
        out, ref = net(x), ref_net(x)
    scale = ref.abs().max()
    torch.testing.assert_close(out / scale, ref / scale, rtol=0, atol=1e-5)
    def count(m):
        return sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())

    assert count(net) == count(ref_net) - expected


def test_training_mode_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(_Branchy().train())
