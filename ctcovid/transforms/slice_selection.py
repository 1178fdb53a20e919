"""Lung-slice selection: which slices of a ``(C, X, Y, Z)`` volume hold lung (from slice-filter
probabilities, or a lung mask's area per slice), and keeping those slices with their original indices
recorded in the meta data (:data:`KEPT_SLICES_KEY`)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_tensor

from ctcovid.io.errors import NoLungSlicesError

from .volume_checks import as_volume_tensor, check_volume, source_name

__all__ = [
    "KEPT_SLICES_KEY",
    "kept_slices_from_meta",
    "SelectLungSlices",
    "SelectLungSlicesd",
    "LungSlicesFromMask",
    "LungSlicesFromMaskd",
]

KEPT_SLICES_KEY = "kept_slices"


def kept_slices_from_meta(meta: Mapping) -> list[int] | None:
    """Original slice indices recorded by :class:`SelectLungSlices` in ``meta`` (``None`` if not recorded)."""
    value = meta.get(KEPT_SLICES_KEY)
    if value is None:
        return None
    return [int(v) for v in str(value).split(",") if v.strip()]


class SelectLungSlices(Transform):
    """Keep the slices whose lung probability reaches ``threshold``, in their original order.

    Args:
        threshold: a slice is kept when its probability is ``>= threshold``.

    ``__call__(img, slice_prob)``:
        img: ``(C, X, Y, Z)`` volume (slices on the last axis).
        slice_prob: ``Z`` per-slice lung probabilities (array / tensor / list; from
            :class:`ctcovid.networks.LungSliceFilter` or :class:`LungSlicesFromMask`).

    Returns ``(C, X, Y, K)`` with the K kept slices. On a MetaTensor the original indices of the kept slices
    are recorded under ``meta["kept_slices"]`` (see :func:`kept_slices_from_meta`; composed with an
    earlier selection if there was one).

    Raises:
        NoLungSlicesError: no slice reaches the threshold (the message names the scan).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = float(threshold)

    def __call__(self, img: NdarrayOrTensor, slice_prob: NdarrayOrTensor | Sequence[float]) -> torch.Tensor:
        img = as_volume_tensor(img)
        check_volume(img, "SelectLungSlices")
        keep = self.kept_indices(slice_prob, img.shape[-1], source_name(img))
        out = img.index_select(img.ndim - 1, keep.to(img.device))
        if isinstance(out, MetaTensor):
            kept = keep.tolist()
            earlier = kept_slices_from_meta(img.meta)
            if earlier is not None and len(earlier) == img.shape[-1]:
                kept = [earlier[i] for i in kept]
            out.meta = dict(out.meta)  # never write into the input's meta dict
            out.meta[KEPT_SLICES_KEY] = ",".join(map(str, kept))
        return out

    def kept_indices(
        self, slice_prob: NdarrayOrTensor | Sequence[float], n_slices: int, name: str = "scan"
    ) -> torch.Tensor:
        """``(K,)`` int64 indices of the slices ``__call__`` keeps, without copying a volume (the pipeline
        needs only the indices: copying the kept slices of a 1000-slice scan cost 1 GB); raises
        :class:`NoLungSlicesError` naming ``name`` when none is kept."""
        prob = torch.as_tensor(convert_to_tensor(slice_prob, track_meta=False)).reshape(-1)
        if prob.numel() != n_slices:
            raise ValueError(f"{name}: {prob.numel()} slice probabilities for a volume of {n_slices} slices")
        keep = torch.nonzero(prob >= self.threshold).flatten()
        if keep.numel() == 0:
            highest = float(prob.max()) if prob.numel() else float("nan")
            raise NoLungSlicesError(
                name,
                f"no slice was judged to contain lung (lung probability >= {self.threshold} on none of "
                f"{n_slices} slices; highest {highest:.3f})",
            )
        return keep


class SelectLungSlicesd(MapTransform):
    """Dictionary twin of :class:`SelectLungSlices`: the same slices are kept in every key.

    Args:
        keys: volumes to cut (e.g. ``["image", "lung_mask"]``).
        prob_key: key of the ``Z`` per-slice lung probabilities.
        threshold: see :class:`SelectLungSlices`.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = SelectLungSlices.backend

    def __init__(
        self,
        keys: KeysCollection,
        prob_key: str = "slice_lung_prob",
        threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.prob_key = prob_key
        self.selector = SelectLungSlices(threshold)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.selector(d[key], d[self.prob_key])
        return d


class LungSlicesFromMask(Transform):
    """Per-slice lung indicator from a lung mask: a slice is lung if its mask area is large enough.

    The slice filter used when no slice-classifier weights are available; its output feeds
    :class:`SelectLungSlices` (threshold 0.5).

    Args:
        min_area: smallest lung area of a lung slice, as a fraction of the slice area
            (``area_unit="fraction"``, default 1 %) or in pixels (``area_unit="pixels"``).
            A lung slice always needs at least one lung pixel.
        area_unit: ``"fraction"`` or ``"pixels"``.
        mask_threshold: mask voxels ``> mask_threshold`` are lung (works for {0, 1} masks, label maps
            with one label per lung, and probabilities).

    ``__call__(mask)``: ``(C, X, Y, Z)`` mask (any channel counts) -> ``(Z,)`` float32 tensor of 0 / 1.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self, min_area: float = 0.01, area_unit: str = "fraction", mask_threshold: float = 0.5
    ) -> None:
        if area_unit not in ("fraction", "pixels"):
            raise ValueError(f"area_unit must be 'fraction' or 'pixels', got {area_unit!r}")
        if min_area < 0 or (area_unit == "fraction" and min_area > 1):
            raise ValueError(f"min_area {min_area} out of range for area_unit={area_unit!r}")
        self.min_area = float(min_area)
        self.area_unit = area_unit
        self.mask_threshold = float(mask_threshold)

    def __call__(self, mask: NdarrayOrTensor) -> torch.Tensor:
        mask = convert_to_tensor(mask, track_meta=False)
        check_volume(mask, "LungSlicesFromMask")
        # 32 slices at a time: on a whole uint8 volume, `mask > 0.5` makes a float32 copy and `.sum()` an
        # int64 one (3 GB on a 1000-slice scan, issue 15)
        area = torch.cat(
            [
                (mask[..., z : z + 32] > self.mask_threshold).any(dim=0).sum(dim=(0, 1))
                for z in range(0, mask.shape[-1], 32)
            ]
        )
        min_pixels = (
            self.min_area * mask.shape[1] * mask.shape[2] if self.area_unit == "fraction" else self.min_area
        )
        return ((area >= min_pixels) & (area > 0)).to(torch.float32)


class LungSlicesFromMaskd(MapTransform):
    """Dictionary twin of :class:`LungSlicesFromMask`: writes the indicator under ``output_key``.

    Args:
        keys: the one lung-mask key.
        output_key: where the ``(Z,)`` indicator goes (what :class:`SelectLungSlicesd` reads).
        min_area, area_unit, mask_threshold: see :class:`LungSlicesFromMask`.
        allow_missing_keys: don't raise if the key is missing.
    """

    backend = LungSlicesFromMask.backend

    def __init__(
        self,
        keys: KeysCollection = "lung_mask",
        output_key: str = "slice_lung_prob",
        min_area: float = 0.01,
        area_unit: str = "fraction",
        mask_threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"LungSlicesFromMaskd takes one mask key, got {self.keys}")
        self.output_key = output_key
        self.indicator = LungSlicesFromMask(min_area, area_unit, mask_threshold)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = self.indicator(d[key])
        return d
