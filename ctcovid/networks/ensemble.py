"""Probability-averaging ensembles of classifiers (the CNR-IEMN detection and severity ensembles).

In training mode an ensemble returns every member's logits stacked, ``(B, M, C)``, so each member is
trained by its own loss (:class:`ctcovid.losses.MemberwiseLoss`); this follows MONAI ``DynUNet``, whose
deep-supervision output is a stack in training only. In evaluation mode it returns the mean of the
members' softmax probabilities, ``(B, C)``: already probabilities, so post-processing must not apply
softmax again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from .detection import DetectionMember
from .factory import register_network
from .severity import SeverityMember

__all__ = ["ProbabilityEnsemble", "DetectionEnsemble", "SeverityEnsemble"]


class ProbabilityEnsemble(nn.Module):
    """Ensemble of classifiers that each map ``x`` to ``(B, C)`` logits.

    Args:
        members: the member networks (any number >= 1); they share input and class layout.

    ``forward(x)``:
        - training mode: ``(B, M, C)`` stacked member logits, M = :attr:`num_members`;
        - evaluation mode: ``(B, C)`` mean over members of ``softmax(logits, dim=1)``.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) == 0:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    @property
    def num_members(self) -> int:
        return len(self.members)

    def member_logits(self, *args: torch.Tensor) -> torch.Tensor:
        """``(B, M, C)`` logits of every member (in whatever mode the members are)."""
        return torch.stack([member(*args) for member in self.members], dim=1)

    def member_probabilities(self, *args: torch.Tensor) -> torch.Tensor:
        """``(B, M, C)`` softmax probabilities of every member, float32 even under bf16/fp16 autocast."""
        return torch.softmax(self.member_logits(*args).float(), dim=-1)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.member_logits(*args)
        return self.member_probabilities(*args).mean(dim=1)

    def predict_with_spread(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and spread of the members' probabilities.

        Returns:
            ``(mean, spread)``, both ``(B, C)``: ``mean`` is what ``forward`` returns in evaluation mode;
            ``spread`` is the population standard deviation over members (``correction=0``, so a
            single member gives 0, never NaN) of each class probability -- a simple disagreement measure
            in [0, 0.5]. Call it on an ensemble in evaluation mode (``.eval()``) under ``torch.no_grad()``.
        """
        probs = self.member_probabilities(*args)
        return probs.mean(dim=1), probs.std(dim=1, correction=0)


def _build_members(builders: Sequence[Callable[[], nn.Module]], seed: int | None) -> list[nn.Module]:
    """Build members; with ``seed`` member i is initialised under ``seed + i`` (reproducible, still distinct)."""
    members = []
    for i, build in enumerate(builders):
        if seed is None:
            members.append(build())  # the global RNG advances between members: distinct initialisations
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)
                members.append(build())
    return members


@register_network("ct_detection_ensemble")
class DetectionEnsemble(ProbabilityEnsemble):
    """The detection ensemble: ``num_members`` :class:`DetectionMember` networks (3 in the paper).

    Args:
        num_members: number of members.
        in_slices, num_classes, backbone: passed to every :class:`DetectionMember`.
        seed: if given, member i is initialised with ``torch.manual_seed(seed + i)`` (the global RNG state
            is restored afterwards); otherwise members draw from the global RNG in turn.

    Input ``(B, in_slices, H, W)``; output ``(B, M, num_classes)`` logits in training, ``(B, num_classes)``
    mean probabilities in evaluation (class 1 = COVID).
    """

    def __init__(
        self,
        num_members: int = 3,
        in_slices: int = 64,
        num_classes: int = 2,
        backbone: str = "densenet161",
        seed: int | None = None,
    ) -> None:
        builders = [
            lambda: DetectionMember(in_slices=in_slices, num_classes=num_classes, backbone=backbone)
        ] * num_members
        super().__init__(_build_members(builders, seed))


@register_network("ct_severity_ensemble")
class SeverityEnsemble(ProbabilityEnsemble):
    """The severity ensemble: each backbone ``repeats`` times (paper: 3 Inception backbones x 2 = 6 members).

    Members are ordered backbone by backbone: ``(b0, b0, b1, b1, b2, b2)`` for ``repeats=2``.

    Args:
        backbones: timm backbone names of the :class:`SeverityMember` networks.
        repeats: members per backbone.
        slices_a, slices_b, num_classes: passed to every :class:`SeverityMember`.
        seed: as in :class:`DetectionEnsemble`.

    Input ``(B, slices_a + slices_b, H, W)`` (H, W >= 75); output ``(B, M, num_classes)`` logits in
    training, ``(B, num_classes)`` mean probabilities in evaluation (mild, moderate, severe, critical).
    """

    def __init__(
        self,
        backbones: Sequence[str] = ("inception_v3", "inception_v4", "inception_resnet_v2"),
        repeats: int = 2,
        slices_a: int = 32,
        slices_b: int = 16,
        num_classes: int = 4,
        seed: int | None = None,
    ) -> None:
        if isinstance(backbones, str):
            backbones = (backbones,)
        names = tuple(b for b in backbones for _ in range(repeats))

        def builder(name: str) -> Callable[[], nn.Module]:
            return lambda: SeverityMember(
                slices_a=slices_a, slices_b=slices_b, num_classes=num_classes, backbone=name
            )

        super().__init__(_build_members([builder(b) for b in names], seed))
        self.backbone_names = names
