"""What a MONAI Label request may name: study ids of the server's datastore, never server paths.

MONAI Label 0.8.5 passes an ``image`` that names an existing file straight to the model
(``MONAILabelApp.infer``: ``if os.path.exists(image_id)``), so ``POST /infer/<model>?image=/any/server/file``
segments that file, and its error tells whether the file exists. The app calls :func:`check_infer_image`
first: ids are looked up in the datastore as strings, without touching the file system, and anything else is
404. The two paths MONAI Label itself creates are let through: the temporary file of an image uploaded with
the request (``file=``, a ``tmp*`` name directly in the system temporary folder) and a session's image
(under the sessions folder).

Uploads (``PUT /datastore/``) are checked by :func:`check_upload` before anything is stored: a plain id
(no folder, no ``..``) and a readable 3D NIfTI volume, else 4xx.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable

from fastapi import HTTPException

__all__ = ["STUDY_ID", "check_infer_image", "check_study_id", "check_upload", "read_nifti_or_4xx"]

#: A study id: a file name stem, no folder separators, not starting with a dot.
STUDY_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
_UPLOAD_TEMP = re.compile(r"^tmp[A-Za-z0-9_]{4,}(\.[A-Za-z0-9]+)*$")  # tempfile.NamedTemporaryFile names


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(folder))
    return os.path.commonpath([path, folder]) == folder and path != folder


def _made_by_monailabel(image: str, sessions_dir: str | None) -> bool:
    """True for the request's uploaded temporary file or a session image (string checks only)."""
    if not os.path.isabs(image) or ".." in image.replace("\\", "/").split("/"):
        return False
    norm = os.path.normpath(image)
    if os.path.dirname(norm) == os.path.normpath(tempfile.gettempdir()) and _UPLOAD_TEMP.match(os.path.basename(norm)):
        return True
    return bool(sessions_dir) and _inside(norm, sessions_dir)


def check_infer_image(image: object, study_ids: Iterable[str], sessions_dir: str | None = None) -> None:
    """404 unless ``image`` is a datastore study id or a file MONAI Label made for this request.

    Args:
        image: ``request["image"]`` after MONAI Label merged the query, the upload and ``params``.
        study_ids: the datastore's image ids.
        sessions_dir: MONAI Label's session store (``settings.MONAI_LABEL_SESSION_PATH`` or its default).
    """
    if not isinstance(image, str) or not image:
        raise HTTPException(status_code=422, detail="no image: give a study id of this server's datastore")
    ids = set(study_ids)
    if image in ids or _made_by_monailabel(image, sessions_dir):
        return
    raise HTTPException(
        status_code=404,
        detail=f"unknown image id {image!r}: not in the datastore ({len(ids)} images; GET /datastore/?output=all "
        "lists them). Only study ids are accepted, never server paths.",
    )


def check_study_id(image_id: object) -> str:
    """``image_id`` if it is a plain id usable as a file name in the studies folder, else 422."""
    if not isinstance(image_id, str) or not STUDY_ID.match(image_id):
        raise HTTPException(
            status_code=422,
            detail=f"image id {image_id!r} is not a plain name (letters, digits, '_', '-', '.'; no folders, "
            "no leading dot, at most 200 characters)",
        )
    return image_id


def check_upload(image_id: object, filename: str) -> None:
    """422 unless ``filename`` (the uploaded bytes) is a readable 3D (or 4D, one volume) NIfTI image.

    Reads the whole volume: a NIfTI whose header parses but whose gzip stream is cut must be refused here,
    not when a model first opens it. DICOM series are not uploaded one file at a time; they are put as
    folders in the studies folder, which the datastore converts at start.
    """
    import numpy as np

    check_study_id(image_id)
    what = f"upload for {image_id!r}"
    img = read_nifti_or_4xx(
        filename, what, 415, "put DICOM series as folders in the studies folder instead: the server converts them "
        "when it starts"
    )
    try:
        shape = tuple(int(s) for s in img.shape)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for damaged files
        raise HTTPException(status_code=422, detail=f"{what}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    squeezed = [s for s in shape if s != 1]
    if len(shape) < 3 or len(squeezed) != 3 or min(shape[:3]) < 2:
        raise HTTPException(status_code=422, detail=f"upload for {image_id!r}: not a 3D volume (shape {shape})")
    if not np.issubdtype(data.dtype, np.number):
        raise HTTPException(status_code=422, detail=f"upload for {image_id!r}: voxel type {data.dtype} is not numeric")


def read_nifti_or_4xx(filename: str, what: str, not_nifti_status: int, hint: str):
    """``nibabel`` image of ``filename``; ``not_nifti_status`` when its name is not ``.nii``/``.nii.gz``, 422 when
    nibabel cannot read it. ``what`` starts the message (e.g. ``"label for 'rp6'"``)."""
    import nibabel as nib

    name = os.path.basename(filename)
    if not name.endswith((".nii", ".nii.gz")):
        raise HTTPException(status_code=not_nifti_status, detail=f"{what}: {name!r} is not NIfTI (.nii / .nii.gz); {hint}")
    try:
        return nib.load(filename)
    except Exception as e:  # nibabel raises many types for damaged files
        raise HTTPException(status_code=422, detail=f"{what}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
