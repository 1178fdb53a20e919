"""What every CT stage is: a small object that reads and adds to one scan's :class:`ScanContext`.

A stage that needs a network names it (``model``, a key of ``pipeline.models``) and the bundle that holds
it by default; the pipeline loads that bundle for it. Without weights, a stage records
``"skipped: <why>"`` in ``result.stages`` and the scan goes on (``weights`` says whether it may).
Adding a stage is a new module here and one line in :data:`ctcovid.ct.pipeline.STAGE_TYPES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # the pipeline holds the stages: only for annotations
    from ctcovid.ct.context import ScanContext
    from ctcovid.ct.pipeline import CTCovidPipeline

__all__ = ["WEIGHT_RULES", "Stage"]

#: ``"optional"``: the stage has a fallback and is never an error without weights; ``"required"``: the
#: pipeline refuses to load without them; ``"skippable"``: the pipeline's ``skip_missing`` decides.
WEIGHT_RULES = ("optional", "required", "skippable")


class Stage:
    """Base class of the CT stages.

    Class attributes:
        name: the stage's key in ``result.stages``.
        model: key of its network in ``pipeline.models`` (``None``: no network).
        default_bundle: the bundle that holds that network unless the pipeline's ``bundles`` says otherwise.
        weights: one of :data:`WEIGHT_RULES`.
        fold_batchnorm: its network's batch norms may be folded (networks run once per slice gain most).
        timings: the keys it adds to ``result.timings_s``, in order.
    """

    name: ClassVar[str]
    model: ClassVar[str | None] = None
    default_bundle: ClassVar[str | None] = None
    weights: ClassVar[str] = "skippable"
    fold_batchnorm: ClassVar[bool] = False
    timings: ClassVar[tuple[str, ...]] = ()

    def setup(self, pipeline: CTCovidPipeline) -> None:
        """Read once, after the models are loaded, what the stage needs from its bundle (sizes, clean-up)."""

    def run(self, pipeline: CTCovidPipeline, ctx: ScanContext) -> None:
        """Process one scan: read ``ctx``, add to it and to ``ctx.result``."""
        raise NotImplementedError
