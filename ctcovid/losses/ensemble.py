"""Loss for ensembles trained jointly: each member by the same loss, averaged over members.

MONAI's losses take one prediction; an ensemble in training mode (:class:`ctcovid.networks.ProbabilityEnsemble`)
returns all members' logits stacked ``(B, M, C)``. This wrapper is the small piece MONAI lacks.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MemberwiseLoss"]


class MemberwiseLoss(nn.Module):
    """Apply ``loss`` to every ensemble member's logits against the same target and average over members.

    Args:
        loss: a loss taking ``(input (B, C), target)``, e.g. ``torch.nn.CrossEntropyLoss()`` or
            ``monai.losses.FocalLoss(use_softmax=True, to_onehot_y=True)``.

    ``forward(input, target)``:
        input: ``(B, M, C)`` stacked member logits (ensemble in training mode) or ``(B, C)`` logits
            (a single network: then this is just ``loss(input, target)``).
        target: passed unchanged to ``loss`` for every member, in the format ``loss`` expects for a
            ``(B, C)`` input: class indices ``(B,)`` (long) for ``CrossEntropyLoss``; ``(B, 1)`` class
            indices for MONAI ``FocalLoss(to_onehot_y=True, use_softmax=True)``, or one-hot ``(B, C)``
            for ``FocalLoss(use_softmax=True)``.

    Returns the mean over members of the per-member losses (whatever shape ``loss`` reduces to).
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.ndim == 2:
            return self.loss(input, target)
        if input.ndim != 3:
            raise ValueError(
                f"MemberwiseLoss expects (B, M, C) or (B, C) logits, got shape {tuple(input.shape)}"
            )
        losses = [self.loss(input[:, m], target) for m in range(input.shape[1])]
        return torch.stack(losses).mean(dim=0)
