"""Chest X-ray: the Cascade-SEME classifier and the other X-ray models' inference, datalists and evaluation.

- :mod:`ctcovid.cxr.cascade` -- :class:`CXRCascade` (stage 1, viral threshold, stage 2);
  :mod:`ctcovid.cxr.stage` -- one classifier loaded from its bundle; :mod:`ctcovid.cxr.result` -- one image's answer.
- :mod:`ctcovid.cxr.runs` -- the cascade over many files (on the shared :func:`ctcovid.running.run_batch`: resume,
  failures recorded), and its 4-class evaluation.
- :mod:`ctcovid.cxr.datalists` / :mod:`ctcovid.cxr.datasets` -- the bundles' patient-level datalists.
- :mod:`ctcovid.cxr.evaluation` -- report writers and the viral-threshold calibration.
- :mod:`ctcovid.cxr.masks` -- lung masks for regional learning from the X-ray lung segmenter.
"""

from .cascade import STAGE1_BUNDLE, STAGE2_BUNDLE, CXRCascade
from .result import FINAL_LABELS, CXRResult
from .runs import CascadeBatch, CascadeRunRecord, cascade_scores, evaluate_cascade, run_cascade
from .stage import CascadeWeightsError, CXRStage

__all__ = [
    "FINAL_LABELS",
    "STAGE1_BUNDLE",
    "STAGE2_BUNDLE",
    "CXRCascade",
    "CXRResult",
    "CXRStage",
    "CascadeBatch",
    "CascadeRunRecord",
    "CascadeWeightsError",
    "cascade_scores",
    "evaluate_cascade",
    "run_cascade",
]
