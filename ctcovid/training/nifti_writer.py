"""Atomic NIfTI writer for ``SaveImaged`` (MONAI's writers write the final file in place)."""

from __future__ import annotations

import os

from monai.data import NibabelWriter

from ctcovid.io.atomic import atomic_write

__all__ = ["AtomicNibabelWriter", "set_default_permissions"]


class AtomicNibabelWriter(NibabelWriter):
    """:class:`monai.data.NibabelWriter` that writes a temporary file next to the target, then renames it.

    Use as ``SaveImaged(..., writer=AtomicNibabelWriter)``: a run killed while saving leaves no truncated
    mask behind.
    """

    def write(self, filename, verbose: bool = False, **obj_kwargs):  # noqa: D102 (same as NibabelWriter)
        atomic_write(
            filename, lambda tmp: super(AtomicNibabelWriter, self).write(tmp, verbose=verbose, **obj_kwargs)
        )
        set_default_permissions(filename)


def set_default_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions a plain ``open(..., "w")`` would have (mkstemp, used for atomic
    writes, creates 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
