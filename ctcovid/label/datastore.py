"""The app's datastore: MONAI Label's local datastore over a folder of NIfTI files and DICOM series folders.

MONAI Label's local datastore serves image *files*. A DICOM series is a folder, so every sub-folder of
the studies folder holding a CT DICOM series is converted once, with :func:`ctcovid.io.load_ct` (largest
CT series, sorted by position, rescaled to HU), to ``<studies>/<folder name>.nii.gz`` next to it, in
the series' own geometry; it is converted again when the folder changes. MONAI Label's DICOMweb
datastore does the same conversion for PACS studies.

An upload (``PUT /datastore/``) must be a readable 3D NIfTI under a plain id, else 4xx and nothing is stored
(:func:`ctcovid.label.access.check_upload`). Saving a label checks it before it reaches the training set: unknown image -> 404; a label that is not
a NIfTI file or whose voxel grid differs from the image's -> 422, each with a message that says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from ctcovid.io.errors import CTInputError
from ctcovid.label.access import check_study_id, check_upload, read_nifti_or_4xx

__all__ = ["CTStudiesDatastore", "convert_dicom_series"]

logger = logging.getLogger(__name__)

#: Sub-folders of the studies folder that are the datastore's own, never studies.
_OWN_FOLDERS = {"labels", "model", "logs", "lib", "bin"}


def _folder_mtime(folder: Path) -> float:
    """Latest modification time of a folder and the files directly in it."""
    times = [folder.stat().st_mtime]
    with os.scandir(folder) as it:
        times += [e.stat().st_mtime for e in it if e.is_file()]
    return max(times)


def convert_dicom_series(studies: str | os.PathLike) -> dict[str, str]:
    """Convert each DICOM series sub-folder of ``studies`` to ``<studies>/<name>.nii.gz``.

    Returns ``{folder name: outcome}`` where outcome is ``"converted"``, ``"up to date"`` or
    ``"skipped: <why>"`` (not DICOM, unreadable series: logged, the server still starts).
    """
    from ctcovid.io import load_ct
    from ctcovid.io.atomic import write_nifti_atomic

    root = Path(studies)
    outcome: dict[str, str] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.startswith(".") or folder.name in _OWN_FOLDERS:
            continue
        target = root / f"{folder.name}.nii.gz"
        if target.is_file() and target.stat().st_mtime >= _folder_mtime(folder):
            outcome[folder.name] = "up to date"
            continue
        try:
            image = load_ct(folder)
        except CTInputError as e:
            outcome[folder.name] = f"skipped: {e.problem}"
            logger.warning("studies: %s is not used: %s", folder, e)
            continue
        meta = getattr(image, "meta", {})
        if str(meta.get("source_format", "")).lower() != "dicom":
            outcome[folder.name] = f"skipped: not a DICOM series ({meta.get('source_format')})"
            continue
        affine = meta.get("original_affine", meta.get("affine"))
        write_nifti_atomic(_compact(image[0].numpy()), affine, target)
        outcome[folder.name] = "converted"
        logger.info("studies: DICOM series %s -> %s", folder, target)
    return outcome


def _compact(volume):
    """int16 when the rescaled values are whole numbers in range (HU usually are), else as read."""
    import numpy as np

    if volume.size and np.array_equal(volume, np.round(volume)) and -32768 <= volume.min() and volume.max() <= 32767:
        return volume.astype(np.int16)
    return volume


class CTStudiesDatastore(LocalDatastore):
    """:class:`monailabel.datastore.local.LocalDatastore` + DICOM series conversion + label checks.

    Args:
        datastore_path: the studies folder.
        kwargs: passed on to ``LocalDatastore`` (extensions, auto_reload, read_only).
    """

    def __init__(self, datastore_path: str, **kwargs: Any) -> None:
        self.conversions = convert_dicom_series(datastore_path)
        super().__init__(datastore_path, **kwargs)

    def status(self) -> dict[str, Any]:
        s = super().status()
        s["dicom_series"] = dict(self.conversions)
        return s

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        # MONAI Label derives the id from the upload's file name when none is given
        if not image_id:
            name = os.path.basename(image_filename)
            image_id = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else os.path.splitext(name)[0]
        check_upload(image_id, image_filename)
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        if image_id not in self.list_images():
            raise HTTPException(status_code=404, detail=f"unknown image id {image_id!r}: not in the datastore")
        return super().remove_image(image_id)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if image_id not in self.list_images():
            raise HTTPException(
                status_code=404, detail=f"unknown image id {image_id!r}: not in the datastore ({len(self.list_images())} images)"
            )
        check_study_id(label_tag)  # the tag names a folder under labels/
        self._check_label(image_id, label_filename)
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def _check_label(self, image_id: str, label_filename: str) -> None:
        """422 unless the label is a NIfTI file on the image's voxel grid (what training reads)."""
        import nibabel as nib
        import numpy as np

        what = f"label for {image_id!r}"
        label = read_nifti_or_4xx(
            label_filename, what, 422, "save labels as .nii.gz (3D Slicer MONAI Label module: file extension .nii.gz)"
        )
        shape = tuple(int(s) for s in label.shape[:3])
        image = nib.load(self.get_image_uri(image_id))
        if shape != tuple(int(s) for s in image.shape[:3]):
            raise HTTPException(
                status_code=422,
                detail=f"label for {image_id!r}: voxel grid {shape} differs from the image's {tuple(image.shape[:3])}",
            )
        if not np.allclose(label.affine, image.affine, atol=1e-3):
            raise HTTPException(
                status_code=422,
                detail=f"label for {image_id!r}: its affine differs from the image's (not drawn on this image)",
            )
