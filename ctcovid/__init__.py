"""ctcovid: MONAI-based COVID-19 detection and severity grading for chest CT and chest X-ray.

Sub-packages (one job each):

- :mod:`ctcovid.io` -- readers for CT (DICOM series, NIfTI, JPG/PNG slice folders) and X-ray images; atomic writes.
- :mod:`ctcovid.transforms` -- MONAI-style array transforms and their dictionary twins.
- :mod:`ctcovid.networks`, :mod:`ctcovid.losses`, :mod:`ctcovid.metrics`, :mod:`ctcovid.visualize` -- building blocks.
- :mod:`ctcovid.bundle` -- helpers shared by the MONAI bundles under ``bundles/``, and loading a network from one.
- :mod:`ctcovid.training` -- datalists, datasets, splits, k-fold and the handlers MONAI lacks.
- :mod:`ctcovid.running` -- batch runs over many inputs, resume, torchrun sharding.
- :mod:`ctcovid.ct` -- the CT pipeline (one module per stage); :mod:`ctcovid.cxr` -- the chest X-ray models.
- :mod:`ctcovid.cli` -- the ``ctcovid`` command line; :mod:`ctcovid.label` -- the MONAI Label app.

Layers only point down, in that order.
"""

import os as _os

# Nothing in ctcovid may download weights: make any stray hub access fail fast instead of hanging.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.2.0"
