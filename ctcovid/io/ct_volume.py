"""The CT volume every reader returns (a MONAI ``MetaTensor``), its metadata keys and the intensity-domain heuristic.

Array layout (all sources): a MONAI ``MetaTensor`` shaped ``(1, X, Y, Z)``, float32, channel first, as
MONAI's ``LoadImage(ensure_channel_first=True)`` gives for a NIfTI file. ``Z`` is the slice axis:
**slice k is** ``image[0, :, :, k]``. For DICOM, ``X`` is the column index (along the IOP row direction),
``Y`` the row index, and slices run in ascending position along the slice normal (inferior -> superior
for ordinary axial series), so ``image[0, :, :, k].T`` is slice k as a DICOM viewer shows it. NIfTI arrays
are kept in their stored order (no reorientation: use MONAI ``Orientationd`` for that). ``meta["affine"]``
maps ``(i, j, k)`` to RAS millimetres, so MONAI ``Orientationd``/``Spacingd``/``Invertd``/``SaveImaged``
work directly.

Metadata (``image.meta``; every key is always present, with scalar or fixed-size values, so MONAI can
collate batches of mixed sources):

========================  =========================================================================
``affine``                torch float64 (4, 4), index -> RAS mm (MONAI key)
``original_affine``       numpy float64 (4, 4), same at load time (MONAI key)
``spatial_shape``         numpy int (3,), ``(X, Y, Z)`` (MONAI key)
``filename_or_obj``       str, the input path as given (MONAI key, used by ``SaveImaged``)
``space``                 ``"RAS"`` (MONAI key)
``original_channel_dim``  0: the channel is already first, so a later ``EnsureChannelFirstd`` is a no-op
``spacing``               tuple of 3 floats, mm per array axis ``(X, Y, Z)`` (column norms of the affine)
``spacing_known``         bool; False for slice-image folders (spacing set to 1 mm) or missing headers
``orientation``           str, axis codes of the affine, e.g. ``"LPS"`` (nibabel ``aff2axcodes``)
``source_format``         ``"dicom"`` | ``"nifti"`` | ``"slices"``
``source_path``           str, absolute path of the file or folder read
``intensity_domain``      ``"hu"`` (Hounsfield units) | ``"display"`` (anything else: 0-4095, 8-bit ...)
``domain_reason``         str, why that domain was chosen
``num_slices``            int, ``Z``
``series_instance_uid``   str, DICOM SeriesInstanceUID ("" for other formats)
``series_selection``      str, which DICOM series was chosen and why ("" for other formats)
``transfer_syntax``       str, DICOM transfer syntax name(s) ("" for other formats)
``input_notes``           str, what the reader changed or chose that a user should know, one note per line:
                          series chosen among several, files dropped, duplicate slices removed, a gantry
                          tilt corrected, a reorientation ("" when nothing)
``input_orientation``     str, the input's axis codes when it was reoriented to axial ("" when stored axially;
                          :mod:`ctcovid.io.orientation`)
``tilt_drift_voxels``     tuple of 2 floats, in-plane shift per slice undone by the gantry-tilt correction
                          ((0, 0) when none; :mod:`ctcovid.io.gantry_tilt`)
========================  =========================================================================

``spacing``, ``orientation``, ``num_slices`` and ``spatial_shape`` describe the volume *as loaded*; after
MONAI spatial transforms use ``img.affine`` / ``img.pixdim`` / ``img.shape``. The intensity transforms of
:mod:`ctcovid.transforms.intensity` add ``intensity_normalization``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import SpaceKeys

from ctcovid.io.errors import NonFiniteValuesError, VolumeTooLargeError

__all__ = [
    "IntensityDomain",
    "SourceFormat",
    "infer_intensity_domain",
    "make_ct_image",
    "check_finite",
    "HU_AIR_LUNG_BAND",
    "MAX_VOXELS",
    "check_volume_size",
    "c_order_xyz",
    "voxel_limit",
]

#: Largest volume read (voxels): 2048 x 2048 x 1000 slices, 16 GB in float32 -- several times any chest CT
#: (512 x 512 x 1000 is 262 M). Larger headers are a corrupt or wrong file; ``CTCOVID_MAX_VOXELS`` overrides.
MAX_VOXELS = 2048 * 2048 * 1000


def voxel_limit() -> int:
    """The most voxels read: ``CTCOVID_MAX_VOXELS`` or :data:`MAX_VOXELS`."""
    return int(os.environ.get("CTCOVID_MAX_VOXELS", MAX_VOXELS))


def check_volume_size(shape, source: str | os.PathLike) -> None:
    """Refuse a volume whose header says it has more than ``CTCOVID_MAX_VOXELS`` voxels, before reading it."""
    limit = voxel_limit()
    n = int(np.prod([int(s) for s in shape], dtype=np.float64))
    if n > limit:
        dims = " x ".join(str(int(s)) for s in shape)
        raise VolumeTooLargeError(
            source,
            f"is {dims} = {n / 1e6:.0f} M voxels ({4 * n / 2**30:.1f} GiB as float32), over the limit of "
            f"{limit / 1e6:.0f} M voxels; not read (a corrupt header or not a CT volume? set CTCOVID_MAX_VOXELS "
            "to raise the limit)",
        )

IntensityDomain = Literal["hu", "display"]
SourceFormat = Literal["dicom", "nifti", "slices"]

#: HU band holding air and lung parenchyma; display-valued images (0..4095, 0..255, 0..1) never reach it.
HU_AIR_LUNG_BAND = (-1200.0, -500.0)


def check_finite(values: np.ndarray, path: str | os.PathLike) -> None:
    """Raise :class:`NonFiniteValuesError` naming ``path`` if ``values`` hold NaN or +-inf."""
    # A float64 sum is finite iff every value is (values here are far below float64 overflow): one cheap
    # pass instead of a full boolean mask; the exact count is only computed on failure.
    if np.isfinite(np.add.reduce(values, axis=None, dtype=np.float64)):
        return
    finite = np.isfinite(values)
    if not finite.all():
        n_bad = int(finite.size - np.count_nonzero(finite))
        raise NonFiniteValuesError(path, f"{n_bad} of {finite.size} voxels are NaN or infinite")


def infer_intensity_domain(
    values: np.ndarray, *, max_samples: int = 2_000_000
) -> tuple[IntensityDomain, str]:
    """Decide whether a CT volume holds Hounsfield units or display values.

    Rule: ``"hu"`` when the 0.5th percentile is <= -500 **and** at least 0.5 % of voxels lie in the
    air/lung band -1200..-500 HU; otherwise ``"display"``. Any chest or body CT in HU has that much air
    or lung (outside air, lungs, trachea, bowel gas), and outside-FOV padding (-2048, -3024) does not
    count towards the band. Display images (MedSeg 0..4095, 8-bit 0..255, 0..1 floats) have no negative
    values at all. A CT stored without its rescale intercept (air at ~0) is reported as display: its
    values are not HU, and percentile scaling still normalises it.

    Args:
        values: the volume (any shape), finite.
        max_samples: the statistics use an evenly strided subset of at most this many voxels (speed).

    Returns:
        ``(domain, reason)`` with a one-line reason giving the statistics.
    """
    flat = np.asarray(values).ravel()
    if flat.size == 0:
        return "display", "empty volume"
    if flat.size > max_samples:
        flat = flat[:: int(np.ceil(flat.size / max_samples))]
    p_low = float(np.percentile(flat, 0.5))
    lo, hi = HU_AIR_LUNG_BAND
    band = float(np.count_nonzero((flat >= lo) & (flat <= hi))) / flat.size
    stats = f"0.5th percentile {p_low:.0f}, {100 * band:.1f}% of voxels in {lo:.0f}..{hi:.0f}"
    if p_low <= -500 and band >= 0.005:
        return "hu", f"values look like HU ({stats})"
    return "display", f"values are not HU-like ({stats})"


def c_order_xyz(arr: np.ndarray, tile: int = 16) -> np.ndarray:
    """C-contiguous float32 copy of an (X, Y, Z) array, as MONAI ``LoadImage`` returns (so ``.view`` etc. work).

    DICOM and slice stacks arrive as (Z, Y, X) buffers (slices in any order, e.g. a reversed view) viewed as
    (X, Y, Z), and nibabel data is Fortran ordered, i.e. the same memory layout. A plain
    ``np.ascontiguousarray`` of that reversed-axes view is cache-hostile (~2.5 s for 512x512x167 on a busy
    2-core machine); copying tile x tile blocks of (Z, Y), bands of Y in two threads (numpy releases the GIL
    while it copies), takes 0.07 s.
    """
    zyx = arr.transpose(2, 1, 0) if arr.ndim == 3 else arr
    item = arr.itemsize
    rows_contiguous = arr.ndim == 3 and zyx.strides[2] == item and zyx.strides[1] == zyx.shape[2] * item
    if arr.flags.c_contiguous or not rows_contiguous:
        return np.ascontiguousarray(arr, dtype=np.float32)
    n_z, n_y, _ = zyx.shape
    out = np.empty(arr.shape, dtype=np.float32)

    def copy_band(y_starts: list[int]) -> None:
        for y0 in y_starts:
            for z0 in range(0, n_z, tile):
                out[:, y0 : y0 + tile, z0 : z0 + tile] = zyx[z0 : z0 + tile, y0 : y0 + tile, :].transpose(2, 1, 0)

    starts = list(range(0, n_y, tile))
    workers = min(2, os.cpu_count() or 1) if arr.size >= 1 << 22 else 1
    if workers == 1:
        copy_band(starts)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(copy_band, [starts[i::workers] for i in range(workers)]))
    return out


def _axcodes(affine: np.ndarray) -> str:
    return "".join(str(c) for c in nib.orientations.aff2axcodes(affine))


def make_ct_image(
    array_xyz: np.ndarray,
    affine: np.ndarray,
    *,
    source_path: str | os.PathLike,
    source_format: SourceFormat,
    domain: IntensityDomain,
    domain_reason: str,
    spacing_known: bool = True,
    series_instance_uid: str = "",
    series_selection: str = "",
    transfer_syntax: str = "",
    input_notes: list[str] | tuple[str, ...] = (),
    tilt_drift_voxels: tuple[float, float] = (0.0, 0.0),
    input_orientation: str = "",
) -> MetaTensor:
    """Wrap an (X, Y, Z) array and its RAS affine into a (1, X, Y, Z) float32 ``MetaTensor`` with the full metadata."""
    arr = c_order_xyz(np.asarray(array_xyz))
    if arr.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) array, got shape {arr.shape}")
    aff = np.asarray(affine, dtype=np.float64)
    path = os.fspath(source_path)
    meta = {
        "affine": torch.as_tensor(aff, dtype=torch.float64),
        "original_affine": aff.copy(),
        "spatial_shape": np.asarray(arr.shape, dtype=np.int64),
        "filename_or_obj": path,
        "space": SpaceKeys.RAS,
        "original_channel_dim": 0,
        "spacing": tuple(float(s) for s in np.linalg.norm(aff[:3, :3], axis=0)),
        "spacing_known": bool(spacing_known),
        "orientation": _axcodes(aff),
        "source_format": source_format,
        "source_path": os.path.abspath(path),
        "intensity_domain": domain,
        "domain_reason": domain_reason,
        "num_slices": int(arr.shape[2]),
        "series_instance_uid": series_instance_uid,
        "series_selection": series_selection,
        "transfer_syntax": transfer_syntax,
        "input_notes": "\n".join(input_notes),  # the notes contain "; " themselves
        "tilt_drift_voxels": tuple(float(v) for v in tilt_drift_voxels),
        "input_orientation": input_orientation,
    }
    return MetaTensor(torch.from_numpy(arr).unsqueeze(0), meta=meta)
