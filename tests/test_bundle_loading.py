"""Loading a stage's network from its bundle (:func:`ctcovid.bundle.loading.load_stage`).

The network is built on the ``meta`` device and the checkpoint's tensors assigned to it (issue 9: weights
held once, no random initialisation); networks that cannot be built that way fall back to the plain path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ctcovid.bundle import bundles_root
from ctcovid.bundle.loading import _build_and_load, load_stage


def test_load_stage_holds_exactly_the_checkpoint():
    weights = bundles_root() / "ct_lung_segmentation" / "models" / "model.pt"
    if not weights.is_file():
        pytest.skip(f"the lung segmenter has no shipped weights ({weights})")
    stage = load_stage("segmentation", "ct_lung_segmentation", device="cpu")
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    loaded = stage.network.state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    tensors = [*stage.network.parameters(), *stage.network.buffers()]
    assert not any(t.is_meta for t in tensors) and all(t.device.type == "cpu" for t in tensors)
    assert all(p.requires_grad for p in stage.network.parameters())  # Grad-CAM needs gradients
    assert not stage.network.training


class _WithDerivedBuffer(nn.Module):
    """A network whose constructor computes a buffer the checkpoint does not hold."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("scale", torch.full((2,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


class _Config:
    """The one ``ConfigParser`` method ``_build_and_load`` uses."""

    def __init__(self, build) -> None:
        self.build = build

    def get_parsed_content(self, key: str, instantiate: bool = True, lazy: bool = True):
        assert key == "network_def"
        return self.build()


def test_non_persistent_buffers_fall_back_to_a_normal_build(tmp_path):
    torch.manual_seed(0)
    ref = _WithDerivedBuffer()
    path = tmp_path / "model.pt"
    torch.save(ref.state_dict(), path)
    net = _build_and_load(_Config(_WithDerivedBuffer), path)
    assert not net.scale.is_meta and torch.equal(net.scale, torch.full((2,), 2.0))
    x = torch.randn(4, 3)
    assert torch.equal(net(x), ref(x))


def test_checkpoint_that_does_not_fit_raises(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"linear.weight": torch.zeros(2, 5), "linear.bias": torch.zeros(2)}, path)  # 5 inputs, not 3
    with pytest.raises(RuntimeError, match="size mismatch"):
        _build_and_load(_Config(_WithDerivedBuffer), path)
