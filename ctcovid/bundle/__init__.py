"""Helpers shared by the MONAI bundles under ``bundles/``.

Bundle configs locate themselves with :func:`bundle_path` so that
``python -m monai.bundle run --config_file bundles/<name>/configs/inference.json`` works from any
working directory, and verify their metadata offline against the schema vendored in this package.
:mod:`ctcovid.bundle.loading` builds a pipeline stage's network from its bundle (imports torch).
"""

from .errors import BundleError, MissingWeightsError
from .utils import (
    BUNDLE_NAMES,
    META_SCHEMA_PATH,
    bundle_path,
    bundles_root,
    load_bundle_metadata,
    verify_bundle_metadata,
)

__all__ = [
    "BUNDLE_NAMES",
    "BundleError",
    "MissingWeightsError",
    "META_SCHEMA_PATH",
    "bundle_path",
    "bundles_root",
    "load_bundle_metadata",
    "verify_bundle_metadata",
]
