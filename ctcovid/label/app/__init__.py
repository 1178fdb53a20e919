"""The MONAI Label app folder (``main.py``); see :mod:`ctcovid.label`."""
