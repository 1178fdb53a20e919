"""Decode a folder's DICOM files in a background thread while their headers are read and checked.

SimpleITK releases the GIL while GDCM decodes, so the pydicom header pass, the series choice and the geometry
checks (~0.3 s for 167 slices here) run alongside the pixel decoding (~1 s) instead of before it; reading a
series then takes about as long as a plain SimpleITK series read (``benchmarks/bench_io_ct.py``). The files
are decoded in name order as one stack, without a GDCM series scan first (that would delay the start).

The checks still decide everything: :meth:`SeriesPrefetch.take` hands the pixels over only when the decoded
files include every file of the series the checks chose, in the checked slice order; otherwise it returns
``None`` and the caller decodes the checked series itself. Nothing here raises: a prefetch that fails
(a stray non-DICOM file, mixed image sizes, too many voxels, an undecodable file) has nothing to hand over,
and a folder whose first, middle and last files belong to different series is not decoded ahead at all.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from ctcovid.io.dicom_headers import DicomHeader

__all__ = ["SeriesPrefetch", "float32_series_reader", "gdcm_warnings_off"]

logger = logging.getLogger(__name__)


def float32_series_reader(sitk, files: Sequence[str]):
    """A SimpleITK ``ImageSeriesReader`` stacking ``files`` in the given order to float32 (each file's own
    slope/intercept applied before the cast), without per-slice metadata dictionaries."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.MetaDataDictionaryArrayUpdateOff()
    return reader


@contextmanager
def gdcm_warnings_off(sitk) -> Iterator[None]:
    """GDCM's notes on odd files (spacing, private tags) are not printed: our own checks report what matters."""
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)


class SeriesPrefetch:
    """Start decoding ``files`` (one folder's candidate DICOM files) to a float32 stack in a daemon thread.

    Args:
        files: the files, in the order they are stacked (the caller's name order).
        max_voxels: decode nothing when the first file's size times the file count exceeds this.
    """

    def __init__(self, files: Sequence[str], max_voxels: int) -> None:
        self.files = [os.fspath(f) for f in files]
        self.max_voxels = max_voxels
        self._image = None  # the SimpleITK image: take() returns a view of its buffer, valid until cancel()
        self._error = ""
        self._cancelled = False
        self._reader = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ctcovid-dicom-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            import SimpleITK as sitk

            with gdcm_warnings_off(sitk):
                self._decode(sitk)
        except Exception as e:  # anything: the caller then decodes the checked series itself
            self._error = f"{type(e).__name__}: {str(e).strip()[:200]}"

    def _decode(self, sitk) -> None:
        # A study folder with several series (thin and thick, two kernels) would be decoded whole, several
        # times the chosen series' time and memory: decline unless the first, middle and last file (name order)
        # are of one series and one size, as in a series folder.
        looks = set()
        for f in {self.files[0], self.files[len(self.files) // 2], self.files[-1]}:
            info = sitk.ImageFileReader()
            info.SetFileName(f)
            info.ReadImageInformation()
            series = info.GetMetaData("0020|000e").strip() if info.HasMetaDataKey("0020|000e") else ""
            looks.add((series, info.GetSize()[:2]))
        if len(looks) > 1:
            self._error = "the files are not of one series"
            return
        ((_, (width, height)),) = looks
        if width * height * len(self.files) > self.max_voxels:
            self._error = "over the voxel limit"  # the checks raise VolumeTooLargeError themselves
            return
        reader = float32_series_reader(sitk, self.files)  # as ctcovid.io.dicom_decode decodes a series
        with self._lock:
            if self._cancelled:
                return
            self._reader = reader
        self._image = reader.Execute()

    def cancel(self) -> None:
        """Stop decoding (series refused, or another decoder used), wait for the thread, free the pixels."""
        with self._lock:
            self._cancelled = True
            if self._reader is not None:
                self._reader.Abort()
        self._thread.join()
        self._image = None

    def take(self, headers: Sequence[DicomHeader]) -> np.ndarray | None:
        """The decoded pixels of ``headers`` in their order as float32 (Z, Y, X), or ``None``.

        The array views the decoded image's buffer where the order allows (the same or the reversed name
        order: no copy of ~175 MB, whose first touch is slow on a VM): copy what you keep before
        :meth:`cancel`. ``None`` when the prefetch failed or lacks any of these files.
        """
        self._thread.join()
        if self._image is None:
            logger.debug(
                "prefetch of %d files: nothing to hand over (%s)", len(self.files), self._error or "cancelled"
            )
            return None
        import SimpleITK as sitk

        stack = sitk.GetArrayViewFromImage(self._image)
        position = {f: i for i, f in enumerate(self.files)}
        order = [position.get(h.path) for h in headers]
        if None in order or stack.shape[1:] != (headers[0].rows, headers[0].columns):
            logger.debug("prefetched files do not hold the checked series; decoding it again")
            self._image = None  # freed before the series is decoded again, not held beside it
            return None
        first, n = order[0], len(order)
        if order == list(range(first, first + n)):
            return stack[first : first + n]
        if order == list(range(first, first - n, -1)):
            return stack[first - n + 1 : first + 1][::-1]
        return stack[np.asarray(order)]
