"""Grad-CAM heat maps (monai.visualize.GradCAM), overlays and atomic PNG writing, on a real radiograph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import data_path
from PIL import Image

from ctcovid.io import load_xray
from ctcovid.networks import SEResNet50
from ctcovid.visualize import gradcam_heatmap, overlay_heatmap, save_png_atomic


@pytest.fixture(scope="module")
def xray_224():
    img = load_xray(data_path("cxr", "kermany", "train", "NORMAL", "IM-0115-0001.jpeg"))
    assert img.shape == (1, 224, 224)
    return img


class _Brightness(nn.Module):
    """Logit 0 = mean brightness, logit 1 = minus it: Grad-CAM on ``features`` must reproduce the image
    for class 0 (positive evidence everywhere in proportion to intensity) and be empty for class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.features.weight)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_gradcam_polarity_and_class_index_on_real_image(xray_224):
    net = _Brightness()
    heat = gradcam_heatmap(net, xray_224[None], "features", class_index=0)
    img = xray_224[0].numpy()
    expected = (img - img.min()) / (img.max() - img.min())
    np.testing.assert_allclose(heat, expected, atol=1e-5)  # 1 = strongest evidence (not MONAI's flipped map)
    assert not np.any(gradcam_heatmap(net, xray_224[None], "features", class_index=1))
    with pytest.raises(ValueError, match="not a module"):
        gradcam_heatmap(net, xray_224[None], "nope")


def test_gradcam_on_seme_resnet(xray_224):
    torch.manual_seed(0)
    net = SEResNet50(in_channels=1, num_classes=3).train()
    heat = gradcam_heatmap(net, xray_224, net.gradcam_layer)  # (C, H, W) accepted too
    assert heat.shape == (224, 224) and heat.dtype == np.float32
    assert heat.min() == 0.0 and heat.max() == 1.0
    assert net.training  # mode restored
    heat2 = gradcam_heatmap(net, xray_224[None], net.gradcam_layer)
    np.testing.assert_allclose(heat, heat2, atol=1e-5)  # deterministic; MoEx off while explaining
    layer = dict(net.named_modules())[net.gradcam_layer]
    assert len(layer._backward_hooks) == 1  # hooks are registered once per network, not per call
    assert all(p.grad is None for p in net.parameters())


def test_backward_stops_at_the_layer_and_gives_the_full_backprop_map(xray_224):
    """The fast path (parameters frozen, backward from the score to the layer only) must give the map MONAI's
    GradCAM gives with a full backward to the input, and the logits of a plain forward pass."""
    from monai.visualize import GradCAM

    from ctcovid.visualize import gradcam_with_logits

    torch.manual_seed(0)
    net = SEResNet50(in_channels=1, num_classes=3).eval()
    x = xray_224[None].float()
    heat, logits = gradcam_with_logits(net, x, net.gradcam_layer, class_index=2)
    torch.manual_seed(0)
    reference_net = SEResNet50(in_channels=1, num_classes=3).eval()  # same weights, no hooks of ours
    reference = GradCAM(reference_net, net.gradcam_layer, postprocessing=lambda m: m)
    raw = reference(x.clone().requires_grad_(True), class_idx=2)
    ref = raw.detach().numpy()[0, 0]
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    np.testing.assert_allclose(heat, ref, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(logits.numpy(), net(x).numpy(), rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad and p.grad is None for p in net.parameters())  # flags restored, no weight grads
    assert not net._forward_hooks  # the logits hook is removed


def test_overlay_and_atomic_png(xray_224, tmp_path):
    img = xray_224[0].numpy()
    heat = np.zeros((7, 7), np.float32)
    heat[3, 3] = 1.0
    over = overlay_heatmap(img, heat, alpha=0.4)
    assert over.shape == (224, 224, 3) and over.dtype == np.uint8
    grey = np.round(255 * (img - img.min()) / (img.max() - img.min()))
    plain = overlay_heatmap(img, heat, alpha=0.0)
    np.testing.assert_array_equal(plain, np.repeat(grey[..., None], 3, axis=2).astype(np.uint8))
    # the hot spot (upsampled to the image centre) is red in jet, the corners blue
    assert over[112, 112, 0] > over[112, 112, 2] and over[5, 5, 2] > over[5, 5, 0]
    out = save_png_atomic(over, tmp_path / "sub" / "overlay.png")
    np.testing.assert_array_equal(np.asarray(Image.open(out)), over)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["overlay.png"]  # no temp file left
    with pytest.raises(ValueError):
        save_png_atomic(np.full((4, 4), 2.0), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
