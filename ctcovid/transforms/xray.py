"""Chest X-ray transforms: lung-only copies for regional learning (CLAHE is in :mod:`.clahe`).

- :class:`LungRegion` / :class:`LungRegiond` -- the image with everything outside the lung mask set to the
  image minimum (the "lung region" input of regional learning).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor

__all__ = ["LungRegion", "LungRegiond", "SaveXRayMaskd"]


class LungRegion(Transform):
    """Keep only the lung: ``image`` where ``mask > 0``, the image minimum elsewhere.

    ``image`` ``(C, H, W)`` and ``mask`` ``(1, H, W)`` or ``(C, H, W)`` (any values; > 0 = lung) of the same
    spatial size -> ``(C, H, W)``. The background value is the image minimum (0 for ``[0, 1]`` radiographs),
    i.e. black like the film background.
    """

    def __call__(self, image: NdarrayOrTensor, mask: NdarrayOrTensor) -> torch.Tensor:
        img = convert_to_tensor(image, track_meta=True)
        m = convert_to_tensor(mask, track_meta=False).to(img.device)
        if img.ndim != 3 or m.ndim != 3 or img.shape[1:] != m.shape[1:] or m.shape[0] not in (1, img.shape[0]):
            raise ValueError(f"LungRegion: image {tuple(img.shape)} and mask {tuple(m.shape)} do not match")
        background = img.min()
        out = torch.where(m > 0, img, background)
        if isinstance(img, MetaTensor) and not isinstance(out, MetaTensor):
            out = MetaTensor(out, meta=img.meta)
        return out


class LungRegiond(MapTransform):
    """Dictionary twin of :class:`LungRegion`: writes the lung-only copy of ``keys`` to ``output_key``.

    Args:
        keys: image key(s), default ``"image"``.
        mask_key: key of the lung mask (``(1, H, W)``, > 0 = lung).
        output_key: key (or one key per image key) receiving the lung-only copy; the original is kept.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "lung_mask",
        output_key: str | Sequence[str] = "lung_image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.output_keys = [output_key] if isinstance(output_key, str) else list(output_key)
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"need one output key per image key: {self.keys} vs {self.output_keys}")
        self.region = LungRegion()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.region(d[key], d[self.mask_key])
        return d


class SaveXRayMaskd(MapTransform):
    """Write 2D masks ``(1, H, W)`` (rows, columns, as :func:`ctcovid.io.load_xray` returns them) to disk,
    atomically, named after the source image.

    MONAI's ``SaveImaged`` is not used because its PNG writer transposes arrays (it assumes MONAI's
    ``(W, H)`` PIL convention) and writes in place; here the file goes to a temporary name first.

    Args:
        keys: mask keys (values > 0 = foreground).
        output_dir: destination folder.
        output_postfix: appended to the source image's stem: ``<stem>_<postfix><ext>``.
        output_ext: ``".png"`` (uint8, 0 / 255) or ``".nii.gz"`` / ``".nii"`` (uint8 0 / 1, the MetaTensor
            affine).
        source_key: key whose MetaTensor ``filename_or_obj`` names the output (default: the mask's own meta).
        path_key_postfix: the written path is stored under ``<key>_<path_key_postfix>``.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str = "./",
        output_postfix: str = "lung_mask",
        output_ext: str = ".png",
        source_key: str | None = "image",
        path_key_postfix: str = "path",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if output_ext not in (".png", ".nii.gz", ".nii"):
            raise ValueError(f"output_ext must be .png, .nii.gz or .nii, got {output_ext!r}")
        self.output_dir = output_dir
        self.output_postfix = output_postfix
        self.output_ext = output_ext
        self.source_key = source_key
        self.path_key_postfix = path_key_postfix

    def _source_name(self, d: Mapping[Hashable, Any], key: Hashable) -> str:
        for obj in (d.get(self.source_key) if self.source_key else None, d[key]):
            if isinstance(obj, MetaTensor) and obj.meta.get("filename_or_obj"):
                return str(obj.meta["filename_or_obj"])
        raise ValueError(f"cannot name the output of {key!r}: no filename_or_obj in its metadata")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import os

        from ctcovid.io.atomic import write_nifti_atomic
        from ctcovid.visualize.gradcam import save_png_atomic

        d = dict(data)
        for key in self.key_iterator(d):
            mask = convert_to_tensor(d[key], track_meta=True)
            arr = (mask.detach().cpu().numpy() > 0).astype(np.uint8)
            if arr.ndim == 3 and arr.shape[0] == 1:
                arr = arr[0]
            if arr.ndim != 2:
                raise ValueError(f"SaveXRayMaskd expects a (1, H, W) mask under {key!r}, got {tuple(mask.shape)}")
            name = os.path.basename(self._source_name(d, key))
            for ext in (".nii.gz", ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".nii", ".bmp", ".tif", ".tiff"):
                if name.lower().endswith(ext):
                    name = name[: -len(ext)]
                    break
            path = os.path.join(self.output_dir, f"{name}_{self.output_postfix}{self.output_ext}")
            if self.output_ext == ".png":
                written = save_png_atomic(arr * 255, path)
            else:
                affine = mask.affine.cpu().numpy() if isinstance(mask, MetaTensor) else np.eye(3)
                aff4 = np.eye(4)  # (row, column) index -> world, padded to NIfTI's 3D affine
                aff4[:2, :2], aff4[:2, 3] = affine[:2, :2], affine[:2, -1]
                written = write_nifti_atomic(arr[:, :, None], aff4, path)
            d[f"{key}_{self.path_key_postfix}"] = str(written)
        return d
