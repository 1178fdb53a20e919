"""Exceptions for bad input.

Every problem with a user's scan or image raises a subclass of :class:`CTInputError` whose message names
the file (or folder) and the problem, so a batch run can record the reason and go on with the next case.
They subclass ``ValueError`` so generic callers that catch bad values still work.
"""

from __future__ import annotations

import os


class CTInputError(ValueError):
    """Base class: an input scan or image cannot be used. ``path`` names the offending file or folder."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class EmptyInputError(CTInputError):
    """A folder holds no readable image files."""


class NoCTSeriesError(CTInputError):
    """A DICOM folder holds no series usable as CT (no CT modality, only localizers, ...)."""


class InconsistentSeriesError(CTInputError):
    """Slices of one series disagree: mixed image sizes, orientations or pixel spacings."""


class SlicePositionError(CTInputError):
    """Duplicate or missing slice positions (the message reports the gap)."""


class CorruptFileError(CTInputError):
    """A file is truncated, corrupt, or not the format its name claims."""


class UnsupportedTransferSyntaxError(CTInputError):
    """A DICOM transfer syntax cannot be decoded with the installed packages (the message names what to install)."""


class DimensionalityError(CTInputError):
    """A 2D image where a volume is required (or the reverse)."""


class NonFiniteValuesError(CTInputError):
    """The pixel data hold NaN or infinite values."""


class NoLungSlicesError(CTInputError):
    """No slice of a scan was judged to contain lung, so no lung volume can be built."""


class InputNotFoundError(CTInputError, FileNotFoundError):
    """The given path does not exist (also a ``FileNotFoundError``)."""


class UnsupportedFormatError(CTInputError):
    """A file is readable but not in a format ctcovid reads as CT (e.g. ``.mha``, enhanced multi-frame DICOM)."""


class CheckpointMismatchError(CTInputError):
    """A local weights file does not fit the network (missing / unexpected keys, wrong tensor shapes)."""


class ImageQualityError(CTInputError):
    """An image fails a quality check (too blurry, contrast too low or too high); the message says which."""


class UnreferencableSeriesError(CTInputError):
    """A DICOM series lacks the UIDs (SOP instance, series, study, frame of reference) a DICOM SEG must
    reference; :func:`ctcovid.io.dicom_uids.copy_with_assigned_uids` writes a copy that has them."""


class ImageTooSmallError(CTInputError):
    """An image has too few pixels to be the scan or radiograph it is given as (e.g. a 1x1 PNG)."""


class VolumeTooLargeError(CTInputError):
    """A volume's size, known from its headers, is beyond what the pipeline reads (refused before any pixel is
    read); the limit is ``CTCOVID_MAX_VOXELS``."""


__all__ = [
    "CTInputError",
    "ImageTooSmallError",
    "UnreferencableSeriesError",
    "EmptyInputError",
    "NoCTSeriesError",
    "InconsistentSeriesError",
    "SlicePositionError",
    "CorruptFileError",
    "UnsupportedTransferSyntaxError",
    "DimensionalityError",
    "NonFiniteValuesError",
    "NoLungSlicesError",
    "InputNotFoundError",
    "UnsupportedFormatError",
    "CheckpointMismatchError",
    "ImageQualityError",
    "VolumeTooLargeError",
]
