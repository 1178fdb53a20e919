"""Checks and conversions shared by the volume transforms (:mod:`~.slice_selection`, :mod:`~.volume`)."""

from __future__ import annotations

import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.utils import convert_to_tensor

from ctcovid.io.errors import CTInputError

__all__ = ["as_volume_tensor", "check_volume", "source_name"]


def as_volume_tensor(img: NdarrayOrTensor) -> torch.Tensor:
    """Torch tensor view of ``img``; a MetaTensor stays one (when meta tracking is on)."""
    return convert_to_tensor(img, track_meta=get_track_meta())


def source_name(img: NdarrayOrTensor) -> str | None:
    """The file a MetaTensor was read from (its ``filename_or_obj``), for error messages; else ``None``."""
    if isinstance(img, MetaTensor):
        name = img.meta.get("filename_or_obj")
        return None if name is None else str(name)
    return None


def check_volume(img: torch.Tensor, what: str) -> None:
    """Raise :class:`CTInputError` naming the file unless ``img`` is a channel-first ``(C, X, Y, Z)`` volume."""
    if img.ndim != 4:
        raise CTInputError(
            source_name(img), f"{what} needs a channel-first volume (C, X, Y, Z), got shape {tuple(img.shape)}"
        )
