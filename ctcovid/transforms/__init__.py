"""ctcovid.transforms."""

from .intensity import (
    NORMALIZATION_META_KEY,
    LungWindow,
    LungWindowd,
    NormalizeCTIntensity,
    NormalizeCTIntensityd,
    RobustDisplayScaling,
    RobustDisplayScalingd,
)
from .quality import (
    AugmentCopiesd,
    CurationReport,
    ImageQualityFilter,
    ImageQualityFilterd,
    QualityAssessment,
    balance_by_augmentation,
    curate,
    laplacian_variance,
    rms_contrast,
    write_curation_report,
)
from .volume import (
    KEPT_SLICES_KEY,
    BuildDetectionInput,
    BuildDetectionInputd,
    BuildSeverityInput,
    BuildSeverityInputd,
    LungSlicesFromMask,
    LungSlicesFromMaskd,
    MaskToLung,
    MaskToLungd,
    ResampleSlices,
    ResampleSlicesd,
    SelectLungSlices,
    SelectLungSlicesd,
    kept_slices_from_meta,
)
from .xray import CLAHE, CLAHEd, LungRegion, LungRegiond, RandCLAHEd, SaveXRayMaskd

__all__ = [
    # intensity.py
    "NORMALIZATION_META_KEY",
    "LungWindow",
    "LungWindowd",
    "RobustDisplayScaling",
    "RobustDisplayScalingd",
    "NormalizeCTIntensity",
    "NormalizeCTIntensityd",
    # quality.py
    "ImageQualityFilter",
    "ImageQualityFilterd",
    "QualityAssessment",
    "laplacian_variance",
    "rms_contrast",
    "CurationReport",
    "curate",
    "write_curation_report",
    "balance_by_augmentation",
    "AugmentCopiesd",
    # xray.py
    "CLAHE",
    "CLAHEd",
    "RandCLAHEd",
    "LungRegion",
    "LungRegiond",
    "SaveXRayMaskd",
    # volume.py
    "KEPT_SLICES_KEY",
    "kept_slices_from_meta",
    "SelectLungSlices",
    "SelectLungSlicesd",
    "LungSlicesFromMask",
    "LungSlicesFromMaskd",
    "MaskToLung",
    "MaskToLungd",
    "ResampleSlices",
    "ResampleSlicesd",
    "BuildDetectionInput",
    "BuildDetectionInputd",
    "BuildSeverityInput",
    "BuildSeverityInputd",
]
