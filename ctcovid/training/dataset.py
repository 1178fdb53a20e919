"""A MONAI ``Dataset`` that turns bad-input errors into either a clear error or a skip record.

MONAI's ``apply_transform`` wraps any exception raised inside a transform in a ``RuntimeError("applying
transform ...")``; the :class:`~ctcovid.io.errors.CTInputError` that names the bad file ends up deep in the
exception chain. :class:`ScanDataset` digs it out:

- ``on_error="raise"`` (training, validation, evaluation): re-raise that ``CTInputError`` itself, so the
  run stops with ``<file>: <problem>`` as its last line;
- ``on_error="skip"`` (inference over a folder): return a failure record instead of the item. The
  collate function :func:`collate_skip_failed` keeps the records out of the batch tensors and passes them
  on under :data:`SKIPPED_KEY`; :func:`ctcovid.training.handlers.skip_failed_scans_iteration` takes them off the
  batch before the network runs, and :class:`ctcovid.training.handlers.ClassificationCSVWriter` writes them to the
  output CSV with their error.

Other exceptions (programming errors, out of memory) always propagate: only bad input is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from monai.data import Dataset, list_data_collate

from ctcovid.io.errors import CTInputError

__all__ = ["ScanDataset", "collate_skip_failed", "find_input_error", "FAILED_KEY", "SKIPPED_KEY"]

#: Marks an item whose transform failed on bad input (``on_error="skip"``).
FAILED_KEY = "_ctcovid_failed"
#: Batch key carrying the failure records of a collated batch (removed before the network runs).
SKIPPED_KEY = "_ctcovid_skipped"


def find_input_error(exc: BaseException) -> CTInputError | None:
    """The first :class:`CTInputError` in ``exc``'s cause/context chain (``exc`` included), else None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, CTInputError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class ScanDataset(Dataset):
    """``monai.data.Dataset`` over scan dicts with explicit handling of bad input.

    Args:
        data: datalist, e.g. from :func:`ctcovid.training.find_scans` (each item has ``image`` and ``name``).
        transform: the preprocessing (``LoadCTd`` ... ``BuildDetectionInputd``).
        on_error: ``"raise"`` re-raises the :class:`CTInputError` naming the file; ``"skip"`` returns
            ``{FAILED_KEY: True, "name", "image", "error", "error_type"}`` instead of the item.
    """

    def __init__(self, data: Sequence, transform: Callable | None = None, on_error: str = "raise") -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        super().__init__(data=data, transform=transform)
        self.on_error = on_error

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as exc:
            err = find_input_error(exc)
            if err is None:
                raise
            if self.on_error == "raise":
                raise err from None  # the last line the user reads is "<file>: <problem>"
            item = self.data[index]
            image = item.get("image") if isinstance(item, dict) else item
            return {
                FAILED_KEY: True,
                "name": str(item.get("name", image)) if isinstance(item, dict) else str(image),
                "image": str(image),
                "error": str(err),
                "error_type": type(err).__name__,
            }


def collate_skip_failed(batch: Sequence[dict]) -> dict:
    """``list_data_collate`` of the good items; failure records go to ``out[SKIPPED_KEY]`` (a list).

    A batch where every item failed collates to ``{SKIPPED_KEY: [...]}`` with no ``image``.
    """
    good = [b for b in batch if not (isinstance(b, dict) and b.get(FAILED_KEY))]
    failed = [
        {k: v for k, v in b.items() if k != FAILED_KEY}
        for b in batch
        if isinstance(b, dict) and b.get(FAILED_KEY)
    ]
    out = list_data_collate(good) if good else {}
    out[SKIPPED_KEY] = failed
    return out
