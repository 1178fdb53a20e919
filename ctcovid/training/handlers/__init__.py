"""Ignite/MONAI handlers and engine helpers that MONAI lacks (each module says what MONAI misses)."""

from .checkpoint import MissingWeightsError, latest_checkpoint, require_checkpoint
from .metrics import MacroF1, macro_f1_score
from .metrics_csv import MetricsCSVLogger
from .predictions import ClassificationCSVWriter, skip_failed_scans_iteration
from .report import ClassificationReportWriter

__all__ = [
    "ClassificationCSVWriter",
    "ClassificationReportWriter",
    "MacroF1",
    "MetricsCSVLogger",
    "MissingWeightsError",
    "latest_checkpoint",
    "macro_f1_score",
    "require_checkpoint",
    "skip_failed_scans_iteration",
]
