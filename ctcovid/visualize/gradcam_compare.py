"""Side-by-side Grad-CAM overlays of several classifiers on the same radiograph (e.g. ResNet-18 vs CBAM-ResNet-18).

One PNG per image: the input, then one Grad-CAM overlay per network, each titled with the network's name,
its predicted class and probability. Heat maps come from :func:`ctcovid.visualize.gradcam.gradcam_heatmap`
(MONAI ``GradCAM``); this module only lays the panels out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .gradcam import gradcam_heatmap, overlay_heatmap, save_png_atomic

__all__ = ["save_gradcam_comparison", "GradCAMComparison"]

_TITLE_H = 26  # two lines of PIL's default bitmap font
_GAP = 4


def _panel_title(panel: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    h, w = panel.shape[:2]
    canvas = Image.new("RGB", (w, h + _TITLE_H), (255, 255, 255))
    canvas.paste(Image.fromarray(panel), (0, _TITLE_H))
    ImageDraw.Draw(canvas).multiline_text((3, 1), text, fill=(0, 0, 0), spacing=1)
    return np.asarray(canvas)


def save_gradcam_comparison(
    image: torch.Tensor | np.ndarray,
    networks: Mapping[str, nn.Module],
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    class_index: int | None = None,
    target_layers: Mapping[str, str] | None = None,
    alpha: float = 0.4,
) -> dict:
    """Write one PNG with the image and a Grad-CAM overlay per network, side by side.

    Args:
        image: ``(C, H, W)`` network input (already pre-processed, on the networks' device).
        networks: name -> classifier mapping ``(1, C, H, W)`` to logits.
        path: output PNG (written atomically).
        class_names: names for the titles (default: class indices).
        class_index: class to explain for every network; ``None`` = each network's own prediction.
        target_layers: name -> Grad-CAM layer; default each network's ``gradcam_layer`` attribute.
        alpha: overlay weight of the heat map.

    Returns:
        ``{"path": str, "networks": {name: {"predicted": class, "probability": p, "layer": layer}}}``.
    """
    x = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    if x.ndim != 3:
        raise ValueError(f"expected one (C, H, W) image, got shape {tuple(x.shape)}")
    grey = x.detach().float().mean(dim=0).cpu().numpy()
    panels = [_panel_title(overlay_heatmap(grey, np.zeros_like(grey), alpha=0.0), "input")]
    info: dict[str, dict] = {}
    for name, net in networks.items():
        layer = (target_layers or {}).get(name) or getattr(net, "gradcam_layer", None)
        if layer is None:
            raise ValueError(f"no Grad-CAM layer for network {name!r}: pass target_layers or set gradcam_layer")
        was_training = net.training
        net.eval()
        with torch.no_grad():
            prob = torch.softmax(net(x[None].float()), dim=1)[0].cpu()
        net.train(was_training)
        pred = int(prob.argmax())
        heat = gradcam_heatmap(net, x[None], layer, class_index=class_index)
        label = class_names[pred] if class_names is not None else str(pred)
        panels.append(_panel_title(overlay_heatmap(grey, heat, alpha=alpha), f"{name}\n{label} {float(prob[pred]):.2f}"))
        info[name] = {"predicted": label, "probability": float(prob[pred]), "layer": layer}
    h = panels[0].shape[0]
    gap = np.full((h, _GAP, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    out = save_png_atomic(np.concatenate(row, axis=1), path)
    return {"path": str(out), "networks": info}


class GradCAMComparison:
    """Write :func:`save_gradcam_comparison` PNGs for a list of images (a bundle config's ``run`` target).

    Args:
        datalist: dicts with ``image`` (path) and optionally ``name``.
        transform: dictionary transform producing the network input ``image`` ``(C, H, W)``.
        networks: name -> network (weights already loaded).
        output_dir: where ``<name>_gradcam.png`` files go.
        class_names: names for the panel titles.
        device: device of the networks.
        checkpoints: name -> weights file loaded (strictly) into that network before the images; a
            missing file raises ``FileNotFoundError`` naming it (never random weights silently).
    """

    def __init__(
        self,
        datalist: Sequence[Mapping],
        transform: Callable,
        networks: Mapping[str, nn.Module],
        output_dir: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        checkpoints: Mapping[str, str | os.PathLike] | None = None,
    ) -> None:
        self.datalist = list(datalist)
        self.transform = transform
        self.networks = dict(networks)
        self.output_dir = Path(output_dir)
        self.class_names = class_names
        self.device = torch.device(device)
        self.checkpoints = dict(checkpoints or {})

    def load_checkpoints(self) -> None:
        for name, path in self.checkpoints.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no trained weights for {name!r}; train it first (see the bundle docs)")
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):  # CheckpointSaver layout
                state = state["model"]
            self.networks[name].load_state_dict(state, strict=True)
            self.networks[name].to(self.device).eval()

    def run(self) -> list[dict]:
        self.load_checkpoints()
        results = []
        for item in self.datalist:
            d = self.transform(dict(item))
            name = item.get("name") or Path(str(item["image"])).name
            stem = Path(str(name)).name.rsplit(".", 1)[0]
            res = save_gradcam_comparison(
                torch.as_tensor(d["image"]).to(self.device),
                self.networks,
                self.output_dir / f"{stem}_gradcam.png",
                class_names=self.class_names,
            )
            res["image"] = str(item["image"])
            results.append(res)
        return results
