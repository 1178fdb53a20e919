"""ctcovid.losses."""

from .ensemble import MemberwiseLoss
from .moex import MoExCrossEntropyLoss
from .regional import RegionalLearningLoss, RegionalPrepareBatch, regional_prepare_batch

__all__ = ["MemberwiseLoss", "MoExCrossEntropyLoss", "RegionalLearningLoss", "RegionalPrepareBatch", "regional_prepare_batch"]
