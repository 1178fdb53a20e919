"""Old import paths kept for one deprecation period (0.2: the layout of issue 14). Each old package is a
module ``__getattr__`` that imports the name from its new home and warns."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

REMOVED_IN = "0.3"


def moved(old: str, new_homes: Mapping[str, str], default_home: str | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for package ``old``: ``name`` now lives in ``new_homes[name]``, or, for any
    other public name of ``default_home``, there."""

    def __getattr__(name: str) -> Any:
        home = new_homes.get(name)
        if home is None and default_home is not None and not name.startswith("_"):
            module = importlib.import_module(default_home)
            home = default_home if name in getattr(module, "__all__", ()) else None
        if home is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"{old}.{name} moved to {home}.{name}; {old} will be removed in ctcovid {REMOVED_IN}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(home), name)

    return __getattr__
