"""MONAI Label app serving the CT models to 3D Slicer.

The app folder is :func:`app_dir` (``ctcovid/label/app``, holding ``main.py``); start it with::

    monailabel start_server --app "$(ctcovid label-app)" --studies <folder of NIfTI files / DICOM series folders>

It serves, from the project's bundles (:mod:`ctcovid.ct`):

- ``lung_segmentation`` (segmentation): the lung mask of the opened CT as a label NIfTI in the image's
  voxel grid, with P(COVID-19) and the severity class probabilities in the result JSON;
- ``covid_detection`` and ``covid_severity`` (classification): JSON results only;
- training of ``lung_segmentation`` from the labels saved in the datastore (``POST /train/lung_segmentation``).

This module imports nothing from ``monailabel`` (an optional extra: ``pip install 'ctcovid[label]'``), so
``ctcovid label-app`` works without it; the task classes live in :mod:`ctcovid.label.infer`,
:mod:`ctcovid.label.train` and :mod:`ctcovid.label.datastore`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["APP_FILES", "app_dir", "copy_app"]

#: Files making up the app folder (MONAI Label loads ``main.py``; the rest of the code is in the package).
APP_FILES = ("main.py",)


def app_dir() -> Path:
    """Folder of the MONAI Label app shipped with the package (``--app`` of ``monailabel start_server``).

    MONAI Label writes ``model/``, ``logs/``, ``lib/`` and ``bin/`` into the app folder at start-up and
    training writes the fine-tuned segmenter under ``model/``: if the package is installed read-only,
    use :func:`copy_app` to get a writable copy.
    """
    return Path(__file__).resolve().parent / "app"


def copy_app(dest: str | os.PathLike) -> Path:
    """Copy the app files into ``dest`` (created if needed) and return its absolute path.

    Existing files of an earlier copy are replaced (each atomically); ``model/`` (fine-tuned weights)
    and ``logs/`` of that copy are kept.
    """
    out = Path(dest).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in APP_FILES:
        tmp = out / f".{name}.tmp"
        shutil.copyfile(app_dir() / name, tmp)
        os.replace(tmp, out / name)
    return out
