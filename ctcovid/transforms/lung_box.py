"""Crop a chest radiograph to its lungs' bounding box, so that a classifier cannot see what lies outside it.

Stage 1 of the X-ray cascade, trained on whole films, leaned on side markers ("R"/"L" letters at the film's
edge) for bacterial films (``benchmarks/cxr_gradcam_lung_share.py``). Cropping to the lung box (plus a margin)
at training and at inference removes the markers, labels and collimation edges that lie outside it.

- :class:`LungBoxCrop` / :class:`LungBoxCropd` -- the crop; the box is found with MONAI's
  ``generate_spatial_bounding_box`` and cut with ``SpatialCrop`` (meta and affine follow). Written here only
  for what ``CropForeground`` does not do: a margin relative to the image size (films come at any
  resolution) and the whole image, not an empty one, when the mask is empty or implausibly small.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, SpatialCrop, Transform
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import convert_to_tensor

__all__ = ["LungBoxCrop", "LungBoxCropd"]


class LungBoxCrop(Transform):
    """The lung mask's bounding box, widened by ``margin``, as a crop of a 2D image.

    Args:
        margin: added on each side, as a fraction of the image's height (rows) and width (columns).
        min_area: a box smaller than this fraction of the image means the mask failed (a speck, nothing):
            the whole image is kept instead.

    ``box(mask)`` with ``mask`` ``(1, H, W)`` (> 0 = lung) -> ``(r0, r1, c0, c1)`` (end exclusive);
    ``__call__(image, mask)`` with ``image`` ``(C, H, W)`` -> the crop ``(C, r1 - r0, c1 - c0)``.
    """

    def __init__(self, margin: float = 0.05, min_area: float = 0.05) -> None:
        if not 0 <= margin < 0.5 or not 0 <= min_area < 1:
            raise ValueError(f"need 0 <= margin < 0.5 and 0 <= min_area < 1, got {margin}, {min_area}")
        self.margin = margin
        self.min_area = min_area

    def box(self, mask: NdarrayOrTensor) -> tuple[int, int, int, int]:
        m = convert_to_tensor(mask, track_meta=False)
        if m.ndim != 3:
            raise ValueError(f"LungBoxCrop: the mask must be (1, H, W), got {tuple(m.shape)}")
        h, w = int(m.shape[1]), int(m.shape[2])
        start, end = generate_spatial_bounding_box(m, select_fn=lambda x: x > 0)
        if (end[0] - start[0]) * (end[1] - start[1]) < self.min_area * h * w:
            return 0, h, 0, w
        dr, dc = round(self.margin * h), round(self.margin * w)
        return max(start[0] - dr, 0), min(end[0] + dr, h), max(start[1] - dc, 0), min(end[1] + dc, w)

    def __call__(self, image: NdarrayOrTensor, mask: NdarrayOrTensor) -> torch.Tensor:
        img = convert_to_tensor(image, track_meta=True)
        if img.ndim != 3 or tuple(img.shape[1:]) != tuple(mask.shape[1:]):
            raise ValueError(f"LungBoxCrop: image {tuple(img.shape)} and mask {tuple(mask.shape)} do not match")
        r0, r1, c0, c1 = self.box(mask)
        return SpatialCrop(roi_start=(r0, c0), roi_end=(r1, c1))(img)


class LungBoxCropd(MapTransform):
    """Dictionary twin of :class:`LungBoxCrop`: crops ``keys`` (the mask too, if listed) to the box of
    ``mask_key`` and stores the box and the uncropped size under ``box_key`` (``{"box": [r0, r1, c0, c1],
    "size": [H, W]}``) so that a map made on the crop can be put back on the whole film.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "lung_mask",
        margin: float = 0.05,
        min_area: float = 0.05,
        box_key: str | None = "lung_box",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.box_key = box_key
        self.cropper = LungBoxCrop(margin, min_area)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = d[self.mask_key]
        r0, r1, c0, c1 = self.cropper.box(mask)
        crop = SpatialCrop(roi_start=(r0, c0), roi_end=(r1, c1))
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) != tuple(mask.shape[1:]):
                raise ValueError(f"LungBoxCropd: {key!r} {tuple(d[key].shape)} and the mask "
                                 f"{tuple(mask.shape)} differ in size")
            d[key] = crop(d[key])
        if self.box_key:
            d[self.box_key] = {"box": [r0, r1, c0, c1], "size": [int(mask.shape[1]), int(mask.shape[2])]}
        return d
