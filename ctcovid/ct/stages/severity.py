"""Severity grading: the kept slices, lung-masked, as 32- and 16-slice stacks at 299² (bundle
``ct_covid_severity_classification``: 6 x [dual conv + Inception]) -> P(mild .. critical) averaged over
the members, on scans predicted COVID-19 unless the pipeline's ``severity_mode`` says otherwise."""

from __future__ import annotations

import torch

from .base import Stage

__all__ = ["DEFAULT_SEVERITY_CLASSES", "SEVERITY_MODES", "SeverityStage"]

#: ``"covid"``: grade severity only on scans predicted COVID-19; ``"always"``: on every scan; ``"never"``.
SEVERITY_MODES = ("covid", "always", "never")

#: Class names used when the bundle's metadata gives no ``channel_def``.
DEFAULT_SEVERITY_CLASSES = ("mild", "moderate", "severe", "critical")


class SeverityStage(Stage):
    """``result.severity_probabilities``, their spread over members and the arg-max ``severity``."""

    name = "severity"
    model = "severity"
    default_bundle = "ct_covid_severity_classification"
    timings = ("volume_building", "severity")

    def run(self, pipeline, ctx) -> None:
        res = ctx.result
        run, why_not = self.should_grade(pipeline, res)
        if not run:
            res.stages["severity"] = why_not
            return
        model = pipeline.models[self.model]
        with ctx.timed("volume_building"):
            x = self.build_input(pipeline, ctx.kept(ctx.views.get(model)), ctx.kept_mask)
        with ctx.timed("severity"):
            self.grade(pipeline, res, x)

    def should_grade(self, pipeline, res) -> tuple[bool, str]:
        """``(True, "")``, or ``(False, why)`` with the ``result.stages`` wording."""
        model = pipeline.models[self.model]
        if not model.available:
            return False, f"skipped: {model.skipped}"
        if pipeline.severity_mode == "never":
            return False, "not run: severity='never'"
        if pipeline.severity_mode == "always":
            return True, ""
        if res.covid_probability is None:
            return False, "not run: no detection result to decide on (use severity='always')"
        if res.prediction != "COVID-19":
            return (
                False,
                f"not run: predicted non-COVID-19 (P={res.covid_probability:.3f} < {pipeline.covid_threshold})",
            )
        return True, ""

    def build_input(self, pipeline, kept_image: torch.Tensor, kept_mask: torch.Tensor) -> torch.Tensor:
        """``(1, a + b, H, W)``: the two depth stacks; lung-masked unless the bundle's ``mask_lung`` is false."""
        from ctcovid.transforms import BuildSeverityInput

        model = pipeline.models[self.model]
        member = model.network.members[0]
        depths = (int(getattr(member, "slices_a", 32)), int(getattr(member, "slices_b", 16)))
        size = model.in_plane_size((299, 299))
        mask = kept_mask if model.config_value("mask_lung", default=True) else None
        return torch.as_tensor(BuildSeverityInput(depths=depths, spatial_size=size)(kept_image, mask))[None]

    def grade(self, pipeline, res, x: torch.Tensor) -> None:
        """Fill the severity fields from the ``(1, a + b, H, W)`` stacks."""
        model = pipeline.models[self.model]
        runner = pipeline.runner
        with torch.inference_mode(), runner.autocast():
            mean, spread = model.network.predict_with_spread(runner.network_input(self.model, x))
        mean, spread = mean.float().cpu(), spread.float().cpu()
        names = model.class_names(DEFAULT_SEVERITY_CLASSES)
        if len(names) != mean.shape[1]:
            names = [f"class_{i}" for i in range(mean.shape[1])]
        res.severity_probabilities = {n: float(p) for n, p in zip(names, mean[0])}
        res.severity_spread = {n: float(v) for n, v in zip(names, spread[0])}
        res.severity = names[int(mean[0].argmax())]
