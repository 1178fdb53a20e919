"""Regional learning (Cascade-SEME): every training image is seen twice, whole and lung-only.

A batch of ``B`` samples becomes ``2B`` network inputs: the original images followed by their lung-only copies
(made by :class:`ctcovid.transforms.LungRegiond` from the X-ray lung segmenter's masks). The loss is the sum of
the two cross-entropies, ``CE(original) + CE(lung region)``.

- :class:`RegionalLearningLoss` -- the loss (MONAI has none like it).
- :class:`RegionalPrepareBatch` / :data:`regional_prepare_batch` -- a MONAI ``prepare_batch`` for
  ``SupervisedTrainer`` / ``SupervisedEvaluator`` that concatenates ``image`` and ``lung_image`` on the batch
  dimension and duplicates the labels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch

from .moex import class_indices

__all__ = ["RegionalLearningLoss", "RegionalPrepareBatch", "regional_prepare_batch"]


def _plain(x: Any) -> torch.Tensor:
    # MetaTensor batch metadata cannot be concatenated meaningfully (two views of one sample): drop it.
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class RegionalLearningLoss(nn.Module):
    """``base(logits[:B], y) + base(logits[B:], y)`` for a ``2B`` batch of originals then lung-only copies.

    Args:
        base: per-half loss taking ``(logits, class indices)``; default :class:`torch.nn.CrossEntropyLoss`.
            A :class:`~ctcovid.losses.MoExCrossEntropyLoss` also works when its MoEx layer is off (MoEx would
            permute across the two halves).

    ``forward(logits (2B, C), target (B,) | (2B,) | (B|2B, 1) | one-hot) -> scalar``. With ``2B`` targets
    (as produced by :data:`regional_prepare_batch`) each half uses its own half of the targets.
    """

    def __init__(self, base: nn.Module | None = None) -> None:
        super().__init__()
        self.base = base if base is not None else nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n = logits.shape[0]
        if n % 2:
            raise ValueError(f"regional learning needs an even batch (originals + lung copies), got {n}")
        b = n // 2
        y = class_indices(target, logits.shape[1]).to(logits.device)
        if y.shape[0] == b:
            y_orig, y_lung = y, y
        elif y.shape[0] == n:
            y_orig, y_lung = y[:b], y[b:]
        else:
            raise ValueError(f"target has {y.shape[0]} labels for {n} logits; expected {b} or {n}")
        return self.base(logits[:b], y_orig) + self.base(logits[b:], y_lung)


class RegionalPrepareBatch(PrepareBatch):
    """``prepare_batch`` for MONAI engines: ``(cat([image, lung_image]), cat([label, label]))``.

    Args:
        image_key: key of the original images ``(B, C, H, W)``.
        lung_key: key of the lung-only copies ``(B, C, H, W)``.
        label_key: key of the labels ``(B, ...)``; when absent the label is ``None`` (inference).
    """

    def __init__(self, image_key: str = "image", lung_key: str = "lung_image", label_key: str = "label") -> None:
        self.image_key = image_key
        self.lung_key = lung_key
        self.label_key = label_key

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        image, lung = batchdata[self.image_key], batchdata[self.lung_key]
        if image.shape != lung.shape:
            raise ValueError(f"{self.image_key} {tuple(image.shape)} and {self.lung_key} {tuple(lung.shape)} differ")
        inputs = torch.cat([_plain(image), _plain(lung)], dim=0)
        inputs = inputs.to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata.get(self.label_key)
        if not isinstance(label, torch.Tensor):
            return inputs, None
        label = _plain(label)
        return inputs, torch.cat([label, label], dim=0).to(device=device, non_blocking=non_blocking, **kwargs)


#: Default instance (keys ``image``, ``lung_image``, ``label``) for ``SupervisedTrainer(prepare_batch=...)``.
regional_prepare_batch = RegionalPrepareBatch()
