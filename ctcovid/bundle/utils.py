"""Locating bundles and verifying their metadata without network access."""

from __future__ import annotations

import json
import os
from pathlib import Path

#: Every bundle the project ships, by MONAI-Label-friendly name.
BUNDLE_NAMES = (
    "ct_lung_slice_filter",
    "ct_lung_segmentation",
    "ct_lung_infection_segmentation",
    "ct_covid_classification",
    "ct_covid_severity_classification",
    "cxr_lung_segmentation",
    "cxr_pneumonia_type_classification",
    "cxr_covid_viral_classification",
    "cxr_covid_resnet18_classification",
    "cxr_detl_classification",
    "cxr_vbreathnet_classification",
)

#: JSON schema for ``configs/metadata.json``, vendored so that ``verify_metadata`` never downloads.
#: Written for this project from the MONAI Bundle specification (docs/source/mb_specification.rst).
META_SCHEMA_PATH = Path(__file__).with_name("meta_schema.json")


def bundles_root() -> Path:
    """Folder holding the bundles: ``$CTCOVID_BUNDLE_DIR`` if set, else ``bundles/`` of the source tree (a
    clone or an editable install), else the copy an installed wheel carries (``ctcovid/_bundles``, made by
    setup.py's build step)."""
    env = os.environ.get("CTCOVID_BUNDLE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve()
    source_tree = here.parents[2] / "bundles"
    if (source_tree / BUNDLE_NAMES[0]).is_dir():
        return source_tree
    return here.parents[1] / "_bundles"


def bundle_path(name: str) -> str:
    """Absolute path of bundle ``name`` (used as ``bundle_root`` in the bundle configs)."""
    return str(bundles_root() / name)


def load_bundle_metadata(bundle_dir: str | os.PathLike) -> dict:
    """Read ``configs/metadata.json`` of a bundle folder."""
    with open(Path(bundle_dir) / "configs" / "metadata.json", encoding="utf-8") as f:
        return json.load(f)


def verify_bundle_metadata(bundle_dir: str | os.PathLike) -> None:
    """Validate a bundle's metadata against the vendored schema (offline).

    Wraps :func:`monai.bundle.verify_metadata` with ``filepath`` pointing at the vendored schema, so the
    schema URL in the metadata is never fetched. Raises ``ValueError`` naming the bundle on failure.
    """
    from monai.bundle import verify_metadata

    meta_file = Path(bundle_dir) / "configs" / "metadata.json"
    try:
        verify_metadata(meta_file=str(meta_file), filepath=str(META_SCHEMA_PATH))
    except Exception as e:  # jsonschema.ValidationError and friends: say which bundle failed
        raise ValueError(f"{meta_file}: metadata does not match the bundle schema: {e}") from e
