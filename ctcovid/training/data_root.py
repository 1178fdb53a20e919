"""Where the real data is: ``$CTCOVID_DATA``, else ``../shared/data`` beside the repository (development)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_data_root"]


def default_data_root(*parts: str) -> str:
    """``$CTCOVID_DATA/<parts>`` if set, else ``<repo>/../shared/data/<parts>``."""
    env = os.environ.get("CTCOVID_DATA")
    base = Path(env).expanduser().resolve() if env else Path(__file__).resolve().parents[3] / "shared" / "data"
    return str(Path(base, *parts))
