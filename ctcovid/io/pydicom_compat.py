"""The few pydicom APIs that moved between pydicom 2.4 and 3.x, behind one name each.

ctcovid supports both: the MONAI Label extra pins pydicom 2.4 (monailabel 0.8.5's DICOM SEG code fails
with pydicom 3), while the main install takes pydicom 3.
"""

from __future__ import annotations

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
except ImportError:  # pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut


def decoder_status(uid: str) -> tuple[bool, str]:
    """(pydicom can decode transfer syntax ``uid`` with what is installed, text naming what is missing)."""
    from pydicom.uid import UID

    try:
        from pydicom.pixels.decoders.base import get_decoder
    except ImportError:  # pydicom 2.x: pixel data handlers instead of decoders
        import pydicom.config

        handlers = [h for h in pydicom.config.pixel_data_handlers if h.supports_transfer_syntax(UID(uid))]
        if not handlers:
            return False, "pydicom has no handler for it"
        if any(h.is_available() for h in handlers):
            return True, ""
        names = ", ".join(getattr(h, "HANDLER_NAME", h.__name__) for h in handlers)
        return False, f"no available pixel data handler (candidates: {names})"
    try:
        decoder = get_decoder(UID(uid))
    except NotImplementedError:
        return False, "pydicom has no decoder for it"
    if decoder.is_available:
        return True, ""
    return False, "missing decoder plugins: " + "; ".join(decoder.missing_dependencies)


def save_dataset(ds, path) -> None:
    """Write ``ds`` as a DICOM file with a proper file meta header, on pydicom 2.x and 3.x."""
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.save_as(path, write_like_original=False)  # pydicom 2.x


__all__ = ["apply_modality_lut", "apply_voi_lut", "decoder_status", "save_dataset"]
