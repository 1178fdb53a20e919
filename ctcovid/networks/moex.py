"""Moment Exchange (MoEx) feature augmentation.

Li et al., "On Feature Normalization and Data Augmentation" (CVPR 2021): during training, the feature map of
each sample is normalised by its own first and second moments and then re-scaled with the moments of another
sample of the batch; the loss mixes the two samples' labels with weight ``lam`` (see
:class:`ctcovid.losses.MoExCrossEntropyLoss`). At inference the layer is the identity.

MONAI and timm have no MoEx layer, hence this small module.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MomentExchange"]


class MomentExchange(nn.Module):
    """Exchange per-instance feature moments between samples of a training batch.

    The moments are PONO moments (positional normalisation, as in the MoEx paper): for every sample and every
    spatial position, the mean and standard deviation across the channel dimension. With ``x`` of shape
    ``(B, C, *spatial)`` and a random permutation ``perm`` of the batch::

        mean, std = x.mean(1), x.std(1)                      # (B, 1, *spatial)
        out = (x - mean) / std * std[perm] + mean[perm]

    The permutation is kept in :attr:`last_perm` and :attr:`last_applied` tells whether the exchange happened
    in the last forward pass; the MoEx loss reads both to mix ``CE(y)`` and ``CE(y[perm])`` with :attr:`lam`.

    Args:
        p: probability of applying the exchange to a training batch (MoEx paper: 1.0).
        lam: weight of the original label in the mixed loss, ``lam * CE(y) + (1 - lam) * CE(y[perm])``
            (MoEx paper: 0.9 for ImageNet-scale classification). Stored here so that the loss and the layer
            share one setting.
        eps: added to the variance before the square root.

    Input/output: ``(B, C, *spatial)`` tensors of the same shape. In ``eval()`` mode, or for a batch of one,
    the input tensor itself is returned (exact identity).
    """

    def __init__(self, p: float = 1.0, lam: float = 0.9, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"MoEx probability p must be in [0, 1], got {p}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"MoEx lambda must be in [0, 1], got {lam}")
        self.p = float(p)
        self.lam = float(lam)
        self.eps = float(eps)
        self.last_perm: torch.Tensor | None = None
        self.last_applied: bool = False

    def extra_repr(self) -> str:
        return f"p={self.p}, lam={self.lam}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reset first: a loss computed after an eval/no-exchange pass must not reuse an old permutation.
        self.last_applied = False
        self.last_perm = None
        if not self.training or x.shape[0] < 2 or self.p == 0.0:
            return x
        if self.p < 1.0 and torch.rand(()).item() >= self.p:
            return x
        perm = torch.randperm(x.shape[0], device=x.device)
        mean = x.mean(dim=1, keepdim=True)
        std = (x.var(dim=1, keepdim=True, unbiased=False) + self.eps).sqrt()
        out = (x - mean) / std * std[perm] + mean[perm]
        self.last_perm = perm
        self.last_applied = True
        return out
