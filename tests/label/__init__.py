"""MONAI Label app tests (run by `tox -e label`; skipped without monailabel)."""
