"""Deprecated: datalists and datasets moved to :mod:`ctcovid.training`, ``ApplyIfKeyPresentd`` to
:mod:`ctcovid.transforms`; the old names work, with a ``DeprecationWarning``, until ctcovid 0.3."""

from ctcovid._deprecated import moved

__getattr__ = moved(__name__, {"ApplyIfKeyPresentd": "ctcovid.transforms"}, default_home="ctcovid.training")
