"""One scan's state as it goes through the CT stages (:class:`ScanContext`), and the normalised views of the
scan that the stages' networks read (:class:`NormalizedViews`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ctcovid.bundle.loading import StageModel
from ctcovid.running.memory import release_free_memory

from .result import CTResult

__all__ = ["NormalizedViews", "ScanContext", "slice_index", "take_slices"]


def slice_index(kept: Sequence[int]) -> slice | list[int]:
    """``kept`` slice indices as an index for the last axis: a ``slice`` when they are one consecutive run,
    as kept lung slices usually are (indexing then gives a view, no copy of a 300-slice volume), else a list."""
    if len(kept) and list(kept) == list(range(kept[0], kept[0] + len(kept))):
        return slice(kept[0], kept[0] + len(kept))
    return list(kept)


def take_slices(volume: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """``(C, X, Y, Z)`` -> ``(C, X, Y, K)`` slices ``kept``: a view when they are consecutive
    (:func:`slice_index`), else a gathered copy."""
    index = slice_index(kept)
    if isinstance(index, slice):
        return volume[..., index]
    return volume.index_select(volume.ndim - 1, torch.as_tensor(index, dtype=torch.long))


class NormalizedViews:
    """The volume normalised to [0, 1] with each stage's own ``NormalizeCTIntensity`` settings, computed
    once per distinct setting (usually all stages share one).

    Args:
        volume: the scan as read, ``(1, X, Y, Z)``.
        args_by_stage: ``NormalizeCTIntensity`` arguments per model key (from each bundle's preprocessing).
    """

    def __init__(self, volume, args_by_stage: dict[str, dict]) -> None:
        self.volume = volume
        self.args_by_stage = args_by_stage
        self.cache: dict[tuple, torch.Tensor] = {}

    def get(self, model: StageModel) -> torch.Tensor:
        """``(1, X, Y, Z)`` float32 in [0, 1] as ``model``'s bundle normalises it."""
        from ctcovid.transforms import NormalizeCTIntensity

        args = self.args_by_stage.get(model.stage) or {}
        key = tuple(sorted(args.items()))
        if key not in self.cache:
            if self.volume is None:
                raise RuntimeError(f"{model.stage}: its normalised view was not made before the scan was released")
            out = NormalizeCTIntensity(**args)(self.volume)
            out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
            self.cache[key] = out.float().contiguous()
        return self.cache[key]

    def release_source(self, models: Sequence[StageModel]) -> None:
        """Make the views of ``models`` now and drop the reference to the scan's own intensities, which
        nothing after normalisation reads: when the caller handed the volume over (``__call__``, the batch
        runner) it is freed here instead of staying beside its normalised copy (315 MB for 300 slices)."""
        for model in models:
            self.get(model)
        self.volume = None


@dataclass
class ScanContext:
    """What the stages of one scan share: each stage reads what earlier ones added and adds its own.

    Attributes:
        result: the :class:`CTResult` being filled (every stage writes its answers and status here).
        views: the scan normalised per model (:class:`NormalizedViews`).
        source: the input path, for error messages.
        notify: called with each stage name as it starts (progress bars).
        image: ``(1, X, Y, Z)`` the scan normalised as the lung segmenter reads it.
        slice_probabilities: ``(Z,)`` P(lung slice) from the slice filter; ``None`` without it.
    """

    result: CTResult
    views: NormalizedViews
    source: str
    notify: Callable[[str], None] = lambda _stage: None
    image: torch.Tensor | None = None
    slice_probabilities: torch.Tensor | None = None
    _kept_mask: torch.Tensor | None = field(default=None, repr=False)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Announce ``stage``, add the seconds it takes to ``result.timings_s`` and mark it ``ok`` when it
        finishes; the heap pages it freed go back to the system (:func:`release_free_memory`, timed with
        the stage)."""
        self.notify(stage)
        t = time.perf_counter()
        yield
        release_free_memory()
        timings = self.result.timings_s
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t
        if stage != "normalize":
            self.result.stages[stage] = "ok"

    def kept(self, volume: torch.Tensor) -> torch.Tensor:
        """``(C, X, Y, Z)`` -> ``(C, X, Y, K)``: the kept lung slices of ``volume`` (see :func:`take_slices`)."""
        return take_slices(volume, self.result.kept_slices)

    def lung_mask_changed(self) -> None:
        """Forget the cached :attr:`kept_mask` after a stage changed ``result.lung_mask``."""
        self._kept_mask = None

    @property
    def kept_mask(self) -> torch.Tensor:
        """``(1, X, Y, K)`` uint8 lung mask of the kept slices (once the lungs and slices are known)."""
        if self._kept_mask is None:
            self._kept_mask = self.kept(torch.from_numpy(self.result.lung_mask)[None])
        return self._kept_mask
