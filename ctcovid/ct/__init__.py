"""The CT pipeline: :class:`CTCovidPipeline` runs the stages of :mod:`ctcovid.ct.stages` (one module each)
on one scan at a time and returns a :class:`CTResult`.

- :mod:`ctcovid.ct.pipeline` -- orders the stages, loads their bundles, reads and normalises the scan.
- :mod:`ctcovid.ct.stages` -- lung slices, lungs, detection, severity.
- :mod:`ctcovid.ct.context` -- the per-scan state the stages share; :mod:`ctcovid.ct.network_runner` --
  device, precision and batches of the forward passes; :mod:`ctcovid.ct.mask_cleanup` -- the lung mask's
  3D clean-up.
- :mod:`ctcovid.ct.result` -- :class:`CTResult` and its outputs; :mod:`ctcovid.ct.montage` -- the PNG montage.
"""

from .network_runner import PRECISIONS
from .pipeline import DEFAULT_BUNDLES, STAGE_TYPES, STAGES, CTCovidPipeline
from .result import CTResult
from .stages.severity import SEVERITY_MODES

__all__ = ["CTCovidPipeline", "CTResult", "DEFAULT_BUNDLES", "PRECISIONS", "SEVERITY_MODES", "STAGES", "STAGE_TYPES"]
