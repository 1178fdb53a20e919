"""``load_ct``: one entry point for CT on disk (DICOM series folder, NIfTI file, folder of JPG/PNG slices).

Readers return data and metadata only: no normalisation, resampling or reorientation. Layout and
metadata keys are documented in :mod:`ctcovid.io.ct_volume`.
"""

from __future__ import annotations

import logging
import os

from monai.data import MetaTensor
from pydicom.uid import UID

from ctcovid.io.ct_volume import (
    IntensityDomain,
    check_finite,
    check_volume_size,
    infer_intensity_domain,
    make_ct_image,
    voxel_limit,
)
from ctcovid.io.dicom_decode import Backend, decode_series
from ctcovid.io.dicom_headers import DicomHeader, read_header
from ctcovid.io.dicom_prefetch import SeriesPrefetch
from ctcovid.io.dicom_series import check_series_geometry, choose_series
from ctcovid.io.errors import (
    DimensionalityError,
    EmptyInputError,
    InputNotFoundError,
    UnsupportedFormatError,
)
from ctcovid.io.gantry_tilt import correct_gantry_tilt
from ctcovid.io.image_slices import IMAGE_EXTENSIONS, SLICES_AFFINE, read_image_slice, read_slice_stack
from ctcovid.io.nifti import is_nifti, read_nifti
from ctcovid.io.orientation import AXIAL_CODES, to_axial

__all__ = ["dicom_series_files", "load_ct"]

logger = logging.getLogger(__name__)

# Files commonly found next to scans that are certainly not slices (skipped without reading).
_NOT_IMAGES = {
    ".txt", ".csv", ".json", ".xml", ".md", ".pdf", ".html", ".htm", ".log", ".ini", ".yaml", ".yml",
    ".npy", ".npz", ".py", ".zip", ".tar", ".db", ".exe", ".sh", ".bat", ".doc", ".docx", ".xls", ".xlsx",
}  # fmt: skip
# Volume formats we recognise but do not read (clear error instead of "corrupt DICOM").
_OTHER_VOLUME_FORMATS = (
    ".mha",
    ".mhd",
    ".nrrd",
    ".nhdr",
    ".mgz",
    ".hdr",
    ".img",
    ".npy",
    ".npz",
    ".h5",
    ".hdf5",
)

_DOMAINS = ("hu", "display")
_BACKENDS = ("auto", "sitk", "pydicom")


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _resolve_domain(
    forced: IntensityDomain | None, detected: IntensityDomain, reason: str
) -> tuple[IntensityDomain, str]:
    if forced is None:
        return detected, reason
    return forced, f"set by the caller (reader would say {detected}: {reason})"


def load_ct(
    path: str | os.PathLike,
    *,
    allow_2d: bool = False,
    domain: IntensityDomain | None = None,
    backend: Backend = "auto",
) -> MetaTensor:
    """Read a CT scan from disk.

    Args:
        path: a DICOM series folder (non-recursive; the CT series with the most slices is chosen), a NIfTI
            file (``.nii``/``.nii.gz``), a folder of JPG/PNG slices (one scan), or, with ``allow_2d``, a
            single DICOM or image file.
        allow_2d: accept a single 2D image as a one-slice volume; otherwise it raises
            :class:`~ctcovid.io.errors.DimensionalityError`.
        domain: force the intensity domain (``"hu"`` or ``"display"``) instead of detecting it.
            Detection: DICOM with RescaleIntercept -> HU; NIfTI -> :func:`~ctcovid.io.ct_volume.infer_intensity_domain`;
            slice images -> display.
        backend: DICOM pixel decoder: ``"auto"`` (SimpleITK/GDCM when it handles the transfer syntax, else
            pydicom), ``"sitk"`` or ``"pydicom"``.

    Returns:
        float32 ``MetaTensor`` (1, X, Y, Z), slice k is ``image[0, :, :, k]``, with ``affine`` (index -> RAS)
        and the metadata listed in :mod:`ctcovid.io.ct_volume` in ``image.meta``.

    Raises:
        ctcovid.io.errors.CTInputError: a subclass naming the file and the problem for every bad input
        (missing path, empty folder, no CT series, mixed sizes, duplicate or missing slices, corrupt files,
        undecodable transfer syntax, 2D input, NaN/inf values, unsupported format).
    """
    if domain not in (None, *_DOMAINS):
        raise ValueError(f"domain must be one of {_DOMAINS} or None, got {domain!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    src = os.fspath(path)
    if not os.path.exists(src):
        raise InputNotFoundError(src, "does not exist")
    if os.path.isdir(src):
        return _load_folder(src, allow_2d=allow_2d, domain=domain, backend=backend)
    if is_nifti(src):
        return _load_nifti(src, allow_2d=allow_2d, domain=domain)
    suffix = _suffix(src)
    if suffix in IMAGE_EXTENSIONS:
        return _load_single_image(src, allow_2d=allow_2d, domain=domain)
    if suffix in _OTHER_VOLUME_FORMATS:
        raise UnsupportedFormatError(
            src, f"'{suffix}' files are not read; convert to NIfTI (.nii.gz) or give the DICOM series"
        )
    header = read_header(src, claims_dicom=suffix in ("", ".dcm", ".dicom", ".ima"))
    if header is None:
        raise UnsupportedFormatError(src, "is not a DICOM, NIfTI (.nii/.nii.gz) or image (JPG/PNG) file")
    return _load_dicom([header], src, allow_2d=allow_2d, domain=domain, backend=backend, single_file=True)


def _load_dicom(
    headers: list[DicomHeader],
    source: str,
    *,
    allow_2d: bool,
    domain: IntensityDomain | None,
    backend: Backend,
    single_file: bool,
    prefetch: SeriesPrefetch | None = None,
) -> MetaTensor:
    chosen, note = choose_series(headers, source)
    if len(chosen) == 1 and not allow_2d:
        if single_file:
            raise DimensionalityError(
                source,
                "is a single 2D image; a CT volume is required (give the folder holding the whole series)",
            )
        raise DimensionalityError(
            source, f"holds a single-slice CT series ({chosen[0].name}); a CT volume is required"
        )
    geom = check_series_geometry(chosen, source)
    check_volume_size((geom.headers[0].columns, geom.headers[0].rows, len(geom.headers)), source)
    array, used = decode_series(geom.headers, backend, prefetch)
    check_finite(array, source)
    array, affine, tilt = correct_gantry_tilt(array, geom.affine)
    array, affine, input_codes = to_axial(array, affine)
    # choose_series appends "; ..." parts only for something to report: other series, excluded files (localizers,
    # other modalities), dropped copies, derived series, a missing Modality
    notes = [n for n in (note if ";" in note else "", *geom.notes, tilt.note() if tilt else "") if n]
    notes += [_reorientation_note(input_codes)] if input_codes else []
    for n in notes:
        logger.warning("%s: %s", source, n)
    if all(h.has_rescale for h in geom.headers):
        detected, reason = "hu", "DICOM CT rescaled with RescaleSlope/RescaleIntercept"
    else:
        detected, reason = infer_intensity_domain(array)
        reason = f"no RescaleIntercept in the DICOM headers; {reason}"
        logger.warning("%s: %s", source, reason)
    dom, reason = _resolve_domain(domain, detected, reason)
    syntaxes = sorted({h.transfer_syntax for h in geom.headers})
    logger.debug("%s: decoded %d slices with %s", source, len(geom.headers), used)
    return make_ct_image(
        array,
        affine,
        source_path=source,
        source_format="dicom",
        domain=dom,
        domain_reason=reason,
        spacing_known=geom.spacing_known,
        series_instance_uid=geom.headers[0].series_uid,
        series_selection=note,
        input_notes=notes,
        tilt_drift_voxels=tilt.drift_voxels if tilt else (0.0, 0.0),
        input_orientation=input_codes,
        transfer_syntax=", ".join(UID(s).name or s for s in syntaxes),
    )


def _load_nifti(path: str, *, allow_2d: bool, domain: IntensityDomain | None) -> MetaTensor:
    array, affine = read_nifti(path, allow_2d=allow_2d)
    check_finite(array, path)
    detected, reason = infer_intensity_domain(array)
    dom, reason = _resolve_domain(domain, detected, reason)
    logger.info("%s: intensity domain %s (%s)", path, dom, reason)
    array, affine, input_codes = to_axial(array, affine) if array.shape[2] > 1 else (array, affine, "")
    notes = [_reorientation_note(input_codes)] if input_codes else []
    for n in notes:
        logger.warning("%s: %s", path, n)
    return make_ct_image(
        array, affine, source_path=path, source_format="nifti", domain=dom, domain_reason=reason,
        input_notes=notes, input_orientation=input_codes,
    )


def _reorientation_note(input_codes: str) -> str:
    return (
        f"stored with axis codes {input_codes} (slices not axial): reoriented to {''.join(AXIAL_CODES)} for the "
        "networks; masks are written back in the file's own voxel order"
    )


def _slices_volume(array, source: str, domain: IntensityDomain | None) -> MetaTensor:
    check_finite(array, source)
    dom, reason = _resolve_domain(domain, "display", "slice images (JPG/PNG) hold display values")
    return make_ct_image(
        array,
        SLICES_AFFINE,
        source_path=source,
        source_format="slices",
        domain=dom,
        domain_reason=reason,
        spacing_known=False,
    )


def _load_single_image(path: str, *, allow_2d: bool, domain: IntensityDomain | None) -> MetaTensor:
    if not allow_2d:
        raise DimensionalityError(path, "is a single 2D image; a CT volume is required")
    arr = read_image_slice(path)
    return _slices_volume(arr.T[:, :, None], path, domain)


def _may_be_dicom(path: str) -> bool:
    """Not a slice image, a NIfTI file or a known non-image file: worth reading a DICOM header from."""
    return _suffix(path) not in IMAGE_EXTENSIONS and not is_nifti(path) and _suffix(path) not in _NOT_IMAGES


def _dicom_headers(folder: str, candidates: list[str]) -> list[DicomHeader]:
    """Headers of the DICOM files among ``candidates`` (others are skipped with a warning)."""
    headers, skipped = [], []
    for f in candidates:
        h = read_header(f, claims_dicom=_suffix(f) in (".dcm", ".dicom"))
        if h is None:
            skipped.append(os.path.basename(f))
        else:
            headers.append(h)
    if skipped:
        logger.warning("%s: skipped %d non-DICOM file(s): %s", folder, len(skipped), skipped[:5])
    return headers


def dicom_series_files(path: str | os.PathLike) -> list[str]:
    """The files of the DICOM series :func:`load_ct` reads from ``path`` (a series folder or one file), in
    the volume's slice order (slice ``k`` of the volume is file ``k``): the same series choice and checks."""
    src = os.fspath(path)
    if not os.path.isdir(src):
        return [src]
    with os.scandir(src) as it:
        files = sorted(e.path for e in it if e.is_file() and not e.name.startswith("."))
    chosen, _ = choose_series(_dicom_headers(src, [f for f in files if _may_be_dicom(f)]), src)
    return [h.path for h in check_series_geometry(chosen, src).headers]


def _load_folder(
    folder: str, *, allow_2d: bool, domain: IntensityDomain | None, backend: Backend
) -> MetaTensor:
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    files = [e.path for e in entries if e.is_file() and not e.name.startswith(".")]
    n_dirs = sum(1 for e in entries if e.is_dir())
    images = [f for f in files if _suffix(f) in IMAGE_EXTENSIONS]
    niftis = [f for f in files if is_nifti(f)]

    candidates = [f for f in files if _may_be_dicom(f)]
    # GDCM decodes while pydicom reads and we check the headers (ctcovid.io.dicom_prefetch)
    prefetch = SeriesPrefetch(candidates, voxel_limit()) if len(candidates) > 1 and backend != "pydicom" else None
    try:
        headers = _dicom_headers(folder, candidates)
        if headers:
            if images:
                logger.warning("%s: ignoring %d image file(s) next to the DICOM files", folder, len(images))
            return _load_dicom(
                headers, folder, allow_2d=allow_2d, domain=domain, backend=backend, single_file=False,
                prefetch=prefetch,
            )
    finally:
        if prefetch is not None:
            prefetch.cancel()
    if images:
        if len(images) == 1 and not allow_2d:
            raise DimensionalityError(
                folder, f"holds a single 2D image ({os.path.basename(images[0])}); a CT volume is required"
            )
        array, ordered = read_slice_stack(images, folder)
        logger.info(
            "%s: %d slice images in natural name order (%s .. %s)",
            folder,
            len(ordered),
            os.path.basename(ordered[0]),
            os.path.basename(ordered[-1]),
        )
        return _slices_volume(array, folder, domain)
    if niftis:
        raise EmptyInputError(
            folder,
            f"holds no DICOM series or slice images but {len(niftis)} NIfTI file(s); give one NIfTI file itself",
        )
    if not files and not n_dirs:
        raise EmptyInputError(folder, "is empty")
    details = []
    if files:
        details.append(f"{len(files)} file(s) that are not DICOM or JPG/PNG images")
    if n_dirs:
        details.append(f"{n_dirs} sub-folder(s), which are not searched: give one series folder itself")
    raise EmptyInputError(folder, "holds no DICOM or image slices (" + "; ".join(details) + ")")
