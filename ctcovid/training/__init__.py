"""Training support for the lung bundles: datalists from ``../shared/data`` and 2D slice datasets from CT volumes.

- :mod:`ctcovid.training.slices` -- per-slice samples (image, lung mask, lung/non-lung label) from volumes
  and slice images, normalised per volume like inference.
- :mod:`ctcovid.training.lung_datalist` -- builds the committed datalists (``python -m ctcovid.training.lung_datalist``).
- :mod:`ctcovid.training.ma2020` -- patient grouping of the Ma et al. 2D slices and their copies of MedSeg slices.
"""

from .checkpoints import BestMetricState
from .evaluation import LungLabeld, SpacedHausdorffDistance, dice, threshold_lung_mask, voxel_spacing
from .nifti_writer import AtomicNibabelWriter
from .slice_classification import SliceClassifierInferer, SliceProbabilityWriter
from .slices import binarize_label, default_data_root, load_lung_datalist, lung_slice_items, resolve_datalist

__all__ = [
    "AtomicNibabelWriter",
    "BestMetricState",
    "LungLabeld",
    "SpacedHausdorffDistance",
    "dice",
    "threshold_lung_mask",
    "voxel_spacing",
    "SliceClassifierInferer",
    "SliceProbabilityWriter",
    "binarize_label",
    "default_data_root",
    "load_lung_datalist",
    "lung_slice_items",
    "resolve_datalist",
]
