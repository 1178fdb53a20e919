"""COVID-19 detection: the kept slices stacked (bundle ``ct_covid_classification``: 3 x [conv 64->3 +
DenseNet-161]) -> P(COVID-19) averaged over the members with their spread, and the members' mean
Grad-CAM as an in-plane heat map."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import Stage

__all__ = ["DEFAULT_DETECTION_CLASSES", "DetectionStage", "covid_index"]

#: Class names used when the bundle's metadata gives no ``channel_def``.
DEFAULT_DETECTION_CLASSES = ("non-COVID-19", "COVID-19")


def covid_index(names: Sequence[str]) -> int:
    """Index of the COVID-19 class among ``names`` (class 1 if the names do not say)."""
    for i, n in enumerate(names):
        key = "".join(ch for ch in n.lower() if ch.isalnum())
        if key in ("covid", "covid19", "positive"):
            return i
    return 1


class DetectionStage(Stage):
    """``result.covid_probability`` (mean over members), its spread, each member's value, the prediction
    at ``pipeline.covid_threshold`` and, with ``pipeline.use_gradcam``, ``result.heatmap``."""

    name = "detection"
    model = "detection"
    default_bundle = "ct_covid_classification"
    timings = ("volume_building", "detection", "gradcam")

    def run(self, pipeline, ctx) -> None:
        res = ctx.result
        model = pipeline.models[self.model]
        if not model.available:
            res.stages["detection"] = f"skipped: {model.skipped}"
            res.stages["gradcam"] = "not run: detection skipped"
            return
        with ctx.timed("volume_building"):
            x = self.build_input(pipeline, ctx.kept(ctx.views.get(model)), ctx.kept_mask)
        with ctx.timed("detection"):
            class_index = self.detect(pipeline, res, x)
        if not pipeline.use_gradcam:
            res.stages["gradcam"] = "not run: disabled"
            return
        with ctx.timed("gradcam"):
            res.heatmap, res.gradcam_layer = self.gradcam(pipeline, x, class_index, res.shape[:2])

    def build_input(self, pipeline, kept_image: torch.Tensor, kept_mask: torch.Tensor) -> torch.Tensor:
        """``(1, depth, H, W)``: kept slices resampled; lung-masked if the bundle's ``mask_lung`` says so."""
        from ctcovid.transforms import BuildDetectionInput

        model = pipeline.models[self.model]
        depth = int(getattr(model.network.members[0], "in_slices", 64))
        size = model.in_plane_size((224, 224))
        mask = kept_mask if model.config_value("mask_lung", default=True) else None
        return torch.as_tensor(BuildDetectionInput(depth=depth, spatial_size=size)(kept_image, mask))[None]

    def detect(self, pipeline, res, x: torch.Tensor) -> int:
        """Fill the detection fields from the ``(1, S, H, W)`` stack; returns the COVID-19 class index."""
        model = pipeline.models[self.model]
        runner = pipeline.runner
        with torch.inference_mode(), runner.autocast():
            # one pass per member; mean and population std over members as
            # ProbabilityEnsemble.predict_with_spread defines them, plus each member's own value
            members = model.network.member_probabilities(runner.network_input(self.model, x))
        members = members.float().cpu()
        ci = covid_index(model.class_names(DEFAULT_DETECTION_CLASSES))
        p_covid = members[0, :, ci]  # (M,)
        res.covid_probability = float(p_covid.mean())
        res.covid_probability_spread = float(p_covid.std(correction=0))
        res.covid_member_probabilities = [float(v) for v in p_covid]
        res.prediction = "COVID-19" if res.covid_probability >= pipeline.covid_threshold else "non-COVID-19"
        return ci

    def gradcam_layer(self, pipeline, member: torch.nn.Module) -> str:
        """Target layer: the bundle's ``gradcam_target_layer`` or the member's ``gradcam_layer`` if set,
        else the backbone's last feature block (DenseNet ``features.norm5``: last dense block + BN + ReLU)."""
        configured = pipeline.models[self.model].config_value("gradcam_target_layer") or getattr(
            member, "gradcam_layer", None
        )
        if configured:
            return str(configured)
        names = dict(member.named_modules())
        for candidate in ("backbone.features.norm5", "backbone.features"):
            if candidate in names:
                return candidate
        convs = [n for n, m in member.named_modules() if isinstance(m, torch.nn.Conv2d)]
        return convs[-1]

    def gradcam(
        self, pipeline, x: torch.Tensor, class_index: int, out_size: Sequence[int]
    ) -> tuple[np.ndarray, str]:
        """Mean Grad-CAM over the detection members for ``class_index`` -> ``(X, Y)`` map in [0, 1].

        The stack's slices are the channels of one 2D input, so each member gives one in-plane map
        ``(H, W)``; members are averaged (each map is already scaled to [0, 1]) and the mean is resized
        to the scan's in-plane size (the stack was made by resizing whole slices, no cropping).
        """
        from ctcovid.visualize.gradcam import gradcam_heatmap

        maps = []
        layer = ""
        x = pipeline.runner.network_input(self.model, x)
        for member in pipeline.models[self.model].network.members:
            layer = self.gradcam_layer(pipeline, member)
            # always fp32: under bf16 the maps moved too much (Pearson r 0.80 against fp32 on a real scan,
            # benchmarks/results/ct_pipeline.json) for an explanation that should not depend on a speed option
            maps.append(np.asarray(gradcam_heatmap(member, x, layer, class_index=class_index)))
        heat = torch.from_numpy(np.mean(maps, axis=0).astype(np.float32))[None, None]
        heat = F.interpolate(heat, size=tuple(int(s) for s in out_size), mode="bilinear", align_corners=False)
        heat = heat[0, 0].clamp(0, 1).numpy()
        if not math.isfinite(float(heat.sum())):
            heat = np.nan_to_num(heat)
        return heat, layer
