"""MONAI transforms wrapping :func:`ctcovid.io.load_ct`, for use as the first preprocessing step.

Bundle config::

    {"_target_": "ctcovid.io.LoadCTd", "keys": "image"}

The result is the same as ``LoadImaged(keys, ensure_channel_first=True)`` would give for a NIfTI file
(a float32 ``MetaTensor`` (1, X, Y, Z) with ``affine``, ``original_affine``, ``spatial_shape``,
``filename_or_obj``), so ``Orientationd``, ``Spacingd``, ``Invertd`` and ``SaveImaged`` work after it,
plus the CT keys of :mod:`ctcovid.io.ct_volume` (``intensity_domain`` etc.).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from ctcovid.io.ct import load_ct
from ctcovid.io.ct_volume import IntensityDomain
from ctcovid.io.dicom_decode import Backend

__all__ = ["LoadCT", "LoadCTd"]


class LoadCT(Transform):
    """Load a CT scan (DICOM series folder, NIfTI file or JPG/PNG slice folder) as a ``MetaTensor``.

    Args:
        allow_2d: accept a single 2D image as a one-slice volume.
        domain: force the intensity domain (``"hu"``/``"display"``); ``None`` detects it.
        backend: DICOM decoder (``"auto"``, ``"sitk"``, ``"pydicom"``).

    Returns (``__call__(path)``):
        float32 ``MetaTensor`` shaped (1, X, Y, Z); slice k is ``img[0, :, :, k]``.
    """

    def __init__(
        self, allow_2d: bool = False, domain: IntensityDomain | None = None, backend: Backend = "auto"
    ) -> None:
        self.allow_2d = allow_2d
        self.domain = domain
        self.backend = backend

    def __call__(self, filename: str | os.PathLike) -> MetaTensor:
        return load_ct(filename, allow_2d=self.allow_2d, domain=self.domain, backend=self.backend)


class LoadCTd(MapTransform):
    """Dictionary version of :class:`LoadCT`: replaces each path under ``keys`` by its volume.

    Args:
        keys: keys holding paths.
        allow_2d, domain, backend: see :class:`LoadCT`.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        allow_2d: bool = False,
        domain: IntensityDomain | None = None,
        backend: Backend = "auto",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadCT(allow_2d=allow_2d, domain=domain, backend=backend)

    def __call__(self, data: Mapping[Hashable, str | os.PathLike]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
