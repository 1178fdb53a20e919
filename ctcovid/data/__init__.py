"""Datalists and datasets for the classification bundles (code only; no data files live here)."""

from .conditional import ApplyIfKeyPresentd
from .datalists import (
    DETECTION_CLASSES,
    DatalistError,
    cov19ctdb_datalist,
    find_scans,
    load_datalist,
    scan_kind,
    severity_csv_datalist,
)
from .dataset import FAILED_KEY, SKIPPED_KEY, ScanDataset, collate_skip_failed, find_input_error

__all__ = [
    "ApplyIfKeyPresentd",
    "DETECTION_CLASSES",
    "DatalistError",
    "FAILED_KEY",
    "SKIPPED_KEY",
    "ScanDataset",
    "collate_skip_failed",
    "cov19ctdb_datalist",
    "find_input_error",
    "find_scans",
    "load_datalist",
    "scan_kind",
    "severity_csv_datalist",
]
