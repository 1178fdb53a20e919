"""Deprecated: the pipelines moved to :mod:`ctcovid.ct` (CT), :mod:`ctcovid.cxr` (X-ray) and
:mod:`ctcovid.running` (batch runs). ``from ctcovid.pipelines import CTCovidPipeline`` still works, with a
``DeprecationWarning``, until ctcovid 0.3."""

from ctcovid._deprecated import moved

_HOMES = {
    "CTCovidPipeline": "ctcovid.ct",
    "CTResult": "ctcovid.ct",
    "BatchReport": "ctcovid.running",
    "run_batch": "ctcovid.running",
    "BundleError": "ctcovid.bundle",
    "MissingWeightsError": "ctcovid.bundle",
    "CXRCascade": "ctcovid.cxr",
    "CXRResult": "ctcovid.cxr",
    "run_cascade": "ctcovid.cxr",
}
__getattr__ = moved(__name__, _HOMES)
