"""Training support (one home for it): datalists, datasets, splits and k-fold, and the ignite/MONAI
handlers MONAI lacks (:mod:`ctcovid.training.handlers`). Bundle configs reference these by ``_target_``.

- :mod:`ctcovid.training.datalists` -- CT datalists (scan folders, the COV19-CT-DB layouts, CSV/JSON lists).
- :mod:`ctcovid.training.dataset` -- :class:`ScanDataset`: bad inputs raise a named error or become skip records.
- :mod:`ctcovid.training.splits` -- patient-level splits, k folds, class weights, datalist parts.
- :mod:`ctcovid.training.kfold` -- patient-level k-fold cross-validation with MONAI engines.
- :mod:`ctcovid.training.slices` -- per-slice samples (image, lung mask, lung/non-lung label) from CT volumes.
- :mod:`ctcovid.training.lung_datalist` -- builds the lung bundles' committed datalists
  (``python -m ctcovid.training.lung_datalist``); :mod:`ctcovid.training.ma2020` -- patient grouping of the
  Ma et al. 2D slices and their copies of MedSeg slices; :mod:`ctcovid.training.infection_datalist` -- the
  infection bundle's datalist.
- :mod:`ctcovid.training.autocast` -- bf16 autocast for MONAI engines on CPU as well as GPU.
"""

from .autocast import AutocastModule, autocast_network, default_precision, native_bf16
from .checkpoints import BestMetricState, init_from_weights
from .data_root import default_data_root
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
from .evaluation import LungLabeld, SpacedHausdorffDistance, dice, threshold_lung_mask, voxel_spacing
from .nifti_writer import AtomicNibabelWriter
from .slice_classification import SliceClassifierInferer, SliceProbabilityWriter
from .slices import binarize_label, load_lung_datalist, lung_slice_items, resolve_datalist

__all__ = [
    "AtomicNibabelWriter",
    "AutocastModule",
    "autocast_network",
    "default_precision",
    "native_bf16",
    "BestMetricState",
    "init_from_weights",
    "DETECTION_CLASSES",
    "DatalistError",
    "FAILED_KEY",
    "LungLabeld",
    "SKIPPED_KEY",
    "ScanDataset",
    "SliceClassifierInferer",
    "SliceProbabilityWriter",
    "SpacedHausdorffDistance",
    "binarize_label",
    "collate_skip_failed",
    "cov19ctdb_datalist",
    "default_data_root",
    "dice",
    "find_input_error",
    "find_scans",
    "load_datalist",
    "load_lung_datalist",
    "lung_slice_items",
    "resolve_datalist",
    "scan_kind",
    "severity_csv_datalist",
    "threshold_lung_mask",
    "voxel_spacing",
]
