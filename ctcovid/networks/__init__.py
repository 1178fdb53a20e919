"""Network definitions. Backbones come from timm (``pretrained=False``) or MONAI; ctcovid adds the
input blocks, heads and attention modules. Build by class or by name with :func:`create_network`."""

from .batchnorm_folding import fold_batchnorm
from .cbam import CBAM, ChannelAttention, SpatialAttention
from .cxr_segmentation import DeepLabV3LungSegmenter
from .detection import DetectionMember
from .detl import DETL_ARCHS, DETL_TARGET_CLASSES, DETLNet
from .ensemble import DetectionEnsemble, ProbabilityEnsemble, SeverityEnsemble
from .factory import create_network, list_networks, register_network
from .instance_norm import instance_norms_as_group_norms
from .lung_segmenter import LungSegmenter
from .moex import MomentExchange
from .resnet18 import CBAMResNet18Classifier, ResNet18Classifier, load_resnet18_checkpoint
from .seme import SEDenseNet169, SEResNet50
from .severity import SEVERITY_CLASSES, SeverityMember
from .slice_filter import LungSliceFilter
from .vbreathnet import VBREATHNET_CLASSES, VBreathNet

__all__ = [
    "create_network",
    "list_networks",
    "register_network",
    "fold_batchnorm",
    "instance_norms_as_group_norms",
    "LungSliceFilter",
    "LungSegmenter",
    "DetectionMember",
    "SeverityMember",
    "SEVERITY_CLASSES",
    "ProbabilityEnsemble",
    "DetectionEnsemble",
    "SeverityEnsemble",
    "MomentExchange",
    "SEResNet50",
    "SEDenseNet169",
    "DeepLabV3LungSegmenter",
    "CBAM",
    "ChannelAttention",
    "SpatialAttention",
    "ResNet18Classifier",
    "CBAMResNet18Classifier",
    "load_resnet18_checkpoint",
    "DETLNet",
    "DETL_ARCHS",
    "DETL_TARGET_CLASSES",
    "VBreathNet",
    "VBREATHNET_CLASSES",
]
