"""Metrics MONAI / scikit-learn do not package the way the bundles report them."""

from .classification import classification_report, probabilities_and_labels
from .intervals import auc_ci_by_patient, proportion_ci

__all__ = ["classification_report", "probabilities_and_labels", "proportion_ci", "auc_ci_by_patient"]
