"""ctcovid: MONAI-based COVID-19 detection and severity grading for chest CT and chest X-ray.

Sub-packages (one job each):

- :mod:`ctcovid.io` -- readers for CT (DICOM series, NIfTI, JPG/PNG slice folders) and X-ray images.
- :mod:`ctcovid.transforms` -- MONAI-style array transforms and their dictionary twins.
- :mod:`ctcovid.networks` -- network definitions (timm / MONAI backbones plus our heads and blocks).
- :mod:`ctcovid.bundle` -- helpers shared by the MONAI bundles under ``bundles/``.
- :mod:`ctcovid.pipelines` -- end-to-end pipelines used by the CLI and the MONAI Label app.
- :mod:`ctcovid.cli` -- the ``ctcovid`` command line.
"""

import os as _os

# Nothing in ctcovid may download weights: make any stray hub access fail fast instead of hanging.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
