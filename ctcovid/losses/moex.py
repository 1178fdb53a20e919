"""Moment Exchange (MoEx) mixed cross-entropy loss.

MONAI has no MoEx loss. When the network's :class:`~ctcovid.networks.MomentExchange` layer exchanged moments in
the forward pass that produced ``logits``, the loss mixes the sample's own label and its partner's label::

    loss = lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])

otherwise it is plain cross-entropy. The loss reads ``perm``, ``lam`` and whether the exchange happened from the
layer itself, so the network and loss need no extra wiring: in a bundle config
``"loss": {"_target_": "ctcovid.losses.MoExCrossEntropyLoss", "moex": "$@network.moex"}`` (an attribute
needs the ``$`` expression form; a bare ``"@network.moex"`` is not a MONAI reference) and MONAI's
``SupervisedTrainer`` calls ``loss(network(x), y)`` as usual.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctcovid.networks.moex import MomentExchange

__all__ = ["MoExCrossEntropyLoss", "class_indices"]


def class_indices(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices ``(B,)`` (long) from MONAI-style labels: ``(B,)``, ``(B, 1)`` indices or ``(B, C)`` one-hot
    (or probabilities: the arg-max is taken)."""
    if target.ndim == 2 and target.shape[1] == 1:
        target = target[:, 0]
    elif target.ndim == 2 and target.shape[1] == num_classes:
        target = target.argmax(dim=1)
    if target.ndim != 1:
        raise ValueError(f"target must be (B,), (B, 1) or (B, {num_classes}), got shape {tuple(target.shape)}")
    return target.long()


class MoExCrossEntropyLoss(nn.Module):
    """Cross-entropy mixed over the MoEx partner labels.

    Args:
        moex: the network's MoEx layer (``network.moex``); ``None`` gives plain cross-entropy.
        weight: optional class weights ``(C,)`` for the cross-entropy (e.g. for imbalanced classes).

    ``forward(logits (B, C), target (B,) | (B, 1) | (B, C) one-hot) -> scalar``.
    """

    def __init__(self, moex: MomentExchange | None, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if moex is not None and not isinstance(moex, MomentExchange):
            raise TypeError(
                f"moex must be a MomentExchange layer or None, got {type(moex).__name__} {moex!r}"
                " (in a bundle config write \"moex\": \"$@network.moex\")"
            )
        # Keep the layer as a plain attribute, not a submodule: loss.train()/eval()/to() must not touch the
        # network's layer, and the loss's state dict must not duplicate the network's.
        self.__dict__["moex"] = moex
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32)
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = class_indices(target, logits.shape[1]).to(logits.device)
        weight = None if self.weight is None else self.weight.to(logits.device, logits.dtype)
        loss = F.cross_entropy(logits, y, weight=weight)
        moex = self.moex
        if moex is None or not moex.last_applied or moex.last_perm is None:
            return loss
        perm = moex.last_perm.to(y.device)
        if perm.shape[0] != y.shape[0]:
            raise ValueError(f"MoEx permutation covers {perm.shape[0]} samples but the batch has {y.shape[0]}")
        return moex.lam * loss + (1.0 - moex.lam) * F.cross_entropy(logits, y[perm], weight=weight)
