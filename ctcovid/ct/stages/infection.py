"""COVID-19 lesions (ground glass, consolidation): the infection U-Net (bundle ``ct_lung_infection_segmentation``)
on the kept lung slices, restricted to the lungs; then lung involvement per lung and the CT-0..CT-4 grade.

Lesions found inside a lung's outline (its per-slice convex hull) but outside the lung mask -- dense
consolidation a lung segmenter takes for soft tissue -- are added to the lung mask, so the lung volume and
the involvement both count consolidated lung (``lung_mask_added_ml`` says how much).
"""

from __future__ import annotations

import numpy as np

from ctcovid.ct.context import slice_index
from ctcovid.ct.involvement import (
    ct_severity_grade,
    lesions_beyond_lung,
    per_lung_voxels,
    percent_of,
)
from ctcovid.ct.mask_cleanup import as_bool_mask, clean_mask, row_blocks

from .slice_segmentation import SliceSegmentationStage

__all__ = ["InfectionSegmentationStage"]

#: Default involvement (percent of the lung) below which no lesion is counted (CT-0), when the bundle's
#: ``min_involvement_percent`` does not say: the shipped model's false-positive floor on lesion-free lung
#: measured 0.06-0.33 % (bundle docs), so smaller findings are not called lesions.
MIN_INVOLVEMENT_PERCENT = 0.5


class InfectionSegmentationStage(SliceSegmentationStage):
    """``result.infection_mask`` ``(X, Y, Z)`` uint8 and the involvement fields of :class:`CTResult`."""

    name = "infection"
    model = "infection"
    default_bundle = "ct_lung_infection_segmentation"
    fold_batchnorm = True
    timings = ("infection", "involvement")

    def setup(self, pipeline) -> None:
        super().setup(pipeline)
        model = pipeline.models[self.model]
        self.min_involvement = MIN_INVOLVEMENT_PERCENT
        self.clahe = None
        if model.available:
            from ctcovid.transforms import CLAHE

            self.min_involvement = float(
                model.config_value("min_involvement_percent", default=MIN_INVOLVEMENT_PERCENT)
            )
            clip = model.config_value("clahe_clip_limit", default=None)
            #: the bundle equalises each resized slice (CLAHE) before its network, as it trained
            self.clahe = CLAHE(clip_limit=float(clip)) if clip else None

    def prepare_batch(self, pipeline, batch):
        if self.clahe is None:
            return batch
        slices = batch.float().cpu()[:, 0]  # (B, H, W)
        eq = self.clahe(slices.permute(1, 2, 0)[None])[0].permute(2, 0, 1)[:, None]  # per slice
        return pipeline.runner.network_input(self.model, eq.contiguous())

    def run(self, pipeline, ctx) -> None:
        res = ctx.result
        model = pipeline.models[self.model]
        if not model.available:
            res.stages[self.name] = f"skipped: {model.skipped}"
            res.stages["involvement"] = "not run: no infection mask"
            return
        kept = res.kept_slices
        with ctx.timed("infection"):
            found = self.segment(pipeline, ctx.kept(ctx.views.get(model)))  # (X, Y, K)
            found = clean_mask(found, self.cleanup)
        with ctx.timed("involvement"):
            self.measure(res, found, kept)
        ctx.lung_mask_changed()  # it may have grown by consolidation: later stages re-read it

    def measure(self, res, found: np.ndarray, kept) -> None:
        """Fill the result's infection mask, per-lung involvement and grade from ``found`` ``(X, Y, K)``."""
        lung = res.lung_mask
        if not (lung.dtype == np.uint8 and lung.flags.writeable):
            lung = np.asarray(lung > 0, dtype=np.uint8)
        kept = slice_index(kept)  # consecutive slices: views, not gathers along the last axis
        # boolean views of the 0/1 uint8 masks, per-slice work and the lung mask grown in place: whole-volume
        # temporaries of a 1000-slice scan cost 262 MB each (issue 15)
        kept_lung = as_bool_mask(lung[:, :, kept])
        found = as_bool_mask(found)
        consecutive = isinstance(kept, slice)  # then indexing gives views, written in place
        infection = np.zeros(lung.shape, dtype=np.uint8)
        inside = infection[:, :, kept].view(bool) if consecutive else np.zeros(found.shape, dtype=bool)
        grown = lung[:, :, kept].view(bool) if consecutive else kept_lung.copy()
        notched = np.zeros(found.shape[-1], dtype=bool)
        for rows in row_blocks(found):  # blocks of whole rows: contiguous memory, small temporaries
            np.logical_and(found[rows], kept_lung[rows], out=inside[rows])
            notched |= (found[rows] & ~kept_lung[rows]).any(axis=(0, 1))
        n_added = 0
        for k in np.flatnonzero(notched):  # outlines are needed only where lesions reach beyond the lung mask
            added = lesions_beyond_lung(found[:, :, k], kept_lung[:, :, k])
            n_added += int(np.count_nonzero(added))
            inside[:, :, k] |= added
            grown[:, :, k] |= added  # the lung mask grows by the consolidation (in place)
        if not consecutive:
            infection[:, :, kept] = inside
            lung[:, :, kept] = grown
        del inside, grown
        res.lung_mask = lung
        voxel_ml = res.voxel_ml
        # per-lung counts first: the whole-lung counts are their sums (no second pass over the volume)
        sides = per_lung_voxels(res.lung_mask, infection, res.affine)
        res.lung_voxels = sum(n_lung for n_lung, _ in sides.values())
        infection_in_lung = sum(n_inf for _, n_inf in sides.values())
        res.infection_voxels = int(np.count_nonzero(infection))
        res.lung_mask_added_voxels = n_added
        if voxel_ml is not None:
            res.lung_volume_ml = res.lung_voxels * voxel_ml
            res.infection_volume_ml = res.infection_voxels * voxel_ml
        res.infection_mask = infection
        res.lung_involvement_percent = percent_of(infection_in_lung, res.lung_voxels)
        lesion_found = (res.lung_involvement_percent or 0.0) >= self.min_involvement and res.infection_voxels > 0
        res.lungs = {
            side: {
                "volume_ml": None if voxel_ml is None else n_lung * voxel_ml,
                "infection_volume_ml": None if voxel_ml is None else n_inf * voxel_ml,
                "involvement_percent": percent_of(n_inf, n_lung),
            }
            for side, (n_lung, n_inf) in sides.items()
        }
        res.lesion_found = bool(lesion_found)
        res.ct_severity_grade = ct_severity_grade(res.lung_involvement_percent, lesion_found)
        res.ct_severity_source = "involvement"
        res.min_involvement_percent = self.min_involvement

