"""ctcovid.pipelines."""

# CT pipeline (issue 4)
from .batch import BatchReport as BatchReport  # noqa: E402
from .batch import run_batch as run_batch  # noqa: E402
from .bundles import BundleError as BundleError  # noqa: E402
from .bundles import MissingWeightsError as MissingWeightsError  # noqa: E402
from .ct import CTCovidPipeline as CTCovidPipeline  # noqa: E402
from .ct import CTResult as CTResult  # noqa: E402

# X-ray cascade (issue 6)
from .cxr import CXRCascade as CXRCascade  # noqa: E402
from .cxr import CXRResult as CXRResult  # noqa: E402
from .cxr import run_cascade as run_cascade  # noqa: E402
