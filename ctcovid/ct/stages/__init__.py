"""The CT pipeline's stages, one module each, in the order :mod:`ctcovid.ct.pipeline` runs them."""

from .base import Stage
from .detection import DetectionStage
from .infection import InfectionSegmentationStage
from .lung_slices import SliceFilterStage, SliceSelectionStage
from .lungs import LungSegmentationStage
from .severity import SeverityStage

__all__ = [
    "DetectionStage",
    "InfectionSegmentationStage",
    "LungSegmentationStage",
    "SeverityStage",
    "SliceFilterStage",
    "SliceSelectionStage",
    "Stage",
]
