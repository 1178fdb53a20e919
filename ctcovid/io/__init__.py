"""ctcovid.io: readers. CT: :func:`load_ct` -> ``MetaTensor`` (1, X, Y, Z) (layout and meta keys in ``ct_volume``)."""

from .ct import load_ct  # noqa: F401  (CT readers)
from .ct_volume import infer_intensity_domain  # noqa: F401
from .load_transforms import LoadCT, LoadCTd  # noqa: F401
from .xray import LoadXRay, LoadXRayd, load_xray  # noqa: F401  (X-ray readers)
