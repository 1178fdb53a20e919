"""Deprecated: the handlers moved to :mod:`ctcovid.training.handlers`; the old names work, with a
``DeprecationWarning``, until ctcovid 0.3 (bundle configs that say ``ctcovid.handlers.X`` keep running)."""

from ctcovid._deprecated import moved

__getattr__ = moved(__name__, {}, default_home="ctcovid.training.handlers")
