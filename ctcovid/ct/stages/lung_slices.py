"""Which slices hold lung: the ResNeXt-50 slice filter (bundle ``ct_lung_slice_filter``) before
segmentation, as in the paper, and the selection of kept slices after it (filter probabilities, or the
lung mask's area per slice when the filter has no weights)."""

from __future__ import annotations

import torch

from ctcovid.io.errors import NoLungSlicesError

from .base import Stage

__all__ = ["SliceFilterStage", "SliceSelectionStage"]


class SliceFilterStage(Stage):
    """``ctx.slice_probabilities``: P(lung) of every slice from the slice filter; optional (without its
    weights the lung mask's area decides, :class:`SliceSelectionStage`)."""

    name = "slice_filter"
    model = "slice_filter"
    default_bundle = "ct_lung_slice_filter"
    weights = "optional"  # issue 5: the mask area is a working fallback
    fold_batchnorm = True
    timings = ("slice_filter",)

    def run(self, pipeline, ctx) -> None:
        model = pipeline.models[self.model]
        if not model.available:
            ctx.result.stages[self.name] = f"skipped: {model.skipped}; lung-mask area decides"
            ctx.result.slice_selection = "lung_mask_area"
            return
        with ctx.timed(self.name):
            ctx.slice_probabilities = self.probabilities(pipeline, ctx.views.get(model))
        ctx.result.slice_selection = "slice_filter"

    def probabilities(self, pipeline, image: torch.Tensor) -> torch.Tensor:
        """``(1, X, Y, Z)`` in [0, 1] -> ``(Z,)`` probability of the "lung" class per slice."""
        model = pipeline.models[self.model]
        runner = pipeline.runner
        size = model.in_plane_size((224, 224))
        names = [n.lower() for n in model.class_names(("non-lung", "lung"))]
        lung = names.index("lung") if "lung" in names else 1
        out = []
        with torch.inference_mode(), runner.autocast():
            for _, batch in runner.slice_batches(image, size, self.model):
                out.append(torch.softmax(model.network(batch).float(), dim=1)[:, lung].cpu())
        return torch.cat(out)


class SliceSelectionStage(Stage):
    """``result.kept_slices``: slice-filter probability >= ``pipeline.slice_threshold``, else lung-mask
    area >= ``pipeline.min_lung_area`` of the slice; raises :class:`NoLungSlicesError` when none is kept."""

    name = "slice_selection"

    def run(self, pipeline, ctx) -> None:
        from ctcovid.transforms import LungSlicesFromMask, SelectLungSlices

        res = ctx.result
        mask = res.lung_mask
        slice_prob = ctx.slice_probabilities
        if slice_prob is None:
            slice_prob = LungSlicesFromMask(min_area=pipeline.min_lung_area)(torch.from_numpy(mask)[None])
            threshold = 0.5  # the indicator is 0 / 1
        else:
            threshold = pipeline.slice_threshold
        try:
            kept = SelectLungSlices(threshold).kept_indices(slice_prob, res.slices_read, ctx.source)
        except NoLungSlicesError:
            if res.slice_selection == "slice_filter":
                raise
            largest = int(mask.sum(axis=(0, 1)).max()) if mask.size else 0
            raise NoLungSlicesError(
                ctx.source,
                f"no lung slices: the lung mask covers >= {100 * pipeline.min_lung_area:g}% of the slice on none "
                f"of {res.slices_read} slices (largest lung area {largest} of {mask.shape[0] * mask.shape[1]} "
                "pixels)",
            ) from None
        res.kept_slices = kept.tolist()
