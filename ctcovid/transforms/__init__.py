"""ctcovid.transforms: MONAI-style array transforms and their dictionary twins.

- :mod:`~.intensity` -- HU lung window, display-value percentile scaling, :class:`NormalizeCTIntensity`.
- :mod:`~.slice_selection` -- which slices hold lung, and keeping them with their indices.
- :mod:`~.volume` -- lung masking, depth resampling, the detection and severity stacks.
- :mod:`~.clahe` -- CLAHE (batched, as scikit-image computes it); :mod:`~.xray` -- lung regions; :mod:`~.quality` -- image-quality filters and curation.
- :mod:`~.conditional` -- apply a transform only when a key is present.

Each module's ``__all__`` is its public API; this package re-exports all of them.
"""

from . import clahe, conditional, intensity, lung_box, quality, slice_selection, volume, xray
from .clahe import *  # noqa: F403
from .conditional import *  # noqa: F403
from .intensity import *  # noqa: F403
from .lung_box import *  # noqa: F403
from .quality import *  # noqa: F403
from .slice_selection import *  # noqa: F403
from .volume import *  # noqa: F403
from .xray import *  # noqa: F403

__all__ = [name for m in (clahe, conditional, intensity, lung_box, quality, slice_selection, volume, xray) for name in m.__all__]
