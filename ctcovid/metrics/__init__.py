"""Metrics MONAI / scikit-learn do not package the way the bundles report them."""

from .classification import classification_report, probabilities_and_labels

__all__ = ["classification_report", "probabilities_and_labels"]
