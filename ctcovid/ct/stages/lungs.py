"""The lung mask: the Attention U-Net (bundle ``ct_lung_segmentation``) on every slice, then the bundle's
own 3D clean-up; the mask is in the input's geometry and gives the lung volume."""

from __future__ import annotations

from ctcovid.ct.mask_cleanup import clean_mask

from .slice_segmentation import SliceSegmentationStage

__all__ = ["LungSegmentationStage"]


class LungSegmentationStage(SliceSegmentationStage):
    """``result.lung_mask`` ``(X, Y, Z)`` uint8, ``lung_voxels`` and ``lung_volume_ml``; always required."""

    name = "segmentation"
    model = "segmentation"
    default_bundle = "ct_lung_segmentation"
    weights = "required"
    fold_batchnorm = True
    timings = ("segmentation", "mask_cleanup")

    def run(self, pipeline, ctx) -> None:
        res = ctx.result
        with ctx.timed("segmentation"):
            mask = self.segment(pipeline, ctx.image)
        with ctx.timed("mask_cleanup"):  # 3D connected components: timed apart from the network stage
            res.lung_mask = clean_mask(mask, self.cleanup)
        res.lung_voxels = int(res.lung_mask.sum())
        if res.voxel_ml is not None:
            res.lung_volume_ml = res.lung_voxels * res.voxel_ml
