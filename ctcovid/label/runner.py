"""One :class:`~ctcovid.ct.CTCovidPipeline` shared by the app's infer tasks.

The pipeline is built on first use and rebuilt when a weights file changes (a finished training writes
the fine-tuned segmenter; a person drops trained weights into a bundle), so the server never needs a
restart to pick up new weights. Runs are serialised by a lock: the networks are shared and the server
machine is small; MONAI Label itself runs infer requests one after another by default.

Results are cached per study file (path, size, modification time) and weights: the three models answer
from one pipeline run, so asking ``covid_detection`` after ``lung_segmentation`` on the same study costs
nothing. The cache holds the lung mask, not the normalised image.

Nothing here imports ``monailabel``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctcovid.bundle.loading import WEIGHTS_FILE, BundleError, MissingWeightsError, bundle_weights_status
from ctcovid.ct import DEFAULT_BUNDLES, PRECISIONS, SEVERITY_MODES, CTCovidPipeline, CTResult

__all__ = ["FINETUNED_BUNDLE", "TRAINABLE_STAGES", "PipelineRunner", "RunnerOptions"]

logger = logging.getLogger(__name__)

#: Folder name (under the app's model dir) of the lung segmenter fine-tuned from datastore labels.
FINETUNED_BUNDLE = DEFAULT_BUNDLES["segmentation"]
#: Stages the app fine-tunes from datastore labels (each into ``<model_dir>/<its bundle name>``).
TRAINABLE_STAGES = ("segmentation", "infection")


@dataclass
class RunnerOptions:
    """Options of the app's pipeline (``--conf key value`` of ``monailabel start_server``).

    Attributes:
        bundle_dir: folder holding the bundles (``None``: ``$CTCOVID_BUNDLE_DIR`` or the source tree's).
        model_dir: folder where the fine-tuned lung segmenter bundle lives (``<model_dir>/ct_lung_segmentation``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        severity: :data:`ctcovid.ct.pipeline.SEVERITY_MODES` (``"covid"``: grade only predicted COVID-19).
        batch_size: slices per forward pass of the slice-level stages (``None``: the device's fastest).
        precision: ``"fp32"`` or ``"bf16"`` (autocast; see :data:`ctcovid.ct.pipeline.PRECISIONS`).
        covid_threshold: P(COVID-19) from which a scan is predicted COVID-19.
        cache_size: pipeline results kept (most recent studies); 0 disables the cache.
    """

    bundle_dir: str | None = None
    model_dir: str = "model"
    device: str = "auto"
    severity: str = "covid"
    batch_size: int | None = None
    precision: str = "fp32"
    covid_threshold: float = 0.5
    cache_size: int = 4

    @classmethod
    def from_conf(cls, conf: dict[str, str], app_dir: str | os.PathLike) -> RunnerOptions:
        """Parse MONAI Label's string ``conf``; raises ``ValueError`` naming the bad key."""

        def num(key: str, cast, default):
            value = conf.get(key)
            if value in (None, ""):
                return default
            try:
                return cast(value)
            except ValueError:
                raise ValueError(f"--conf {key} {value!r}: expected a {cast.__name__}") from None

        severity = conf.get("severity", "covid")
        if severity not in SEVERITY_MODES:
            raise ValueError(f"--conf severity {severity!r}: expected one of {SEVERITY_MODES}")
        precision = conf.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"--conf precision {precision!r}: expected one of {PRECISIONS}")
        bundle_dir = conf.get("bundle_dir") or os.environ.get("CTCOVID_BUNDLE_DIR") or None
        return cls(
            bundle_dir=str(Path(bundle_dir).expanduser().resolve()) if bundle_dir else None,
            model_dir=str(Path(conf.get("model_dir") or Path(app_dir) / "model").expanduser().resolve()),
            device=conf.get("device", "auto"),
            severity=severity,
            batch_size=num("batch_size", int, None),
            precision=precision,
            covid_threshold=num("covid_threshold", float, 0.5),
            cache_size=num("cache_size", int, 4),
        )


class PipelineRunner:
    """Builds, caches and runs the CT pipeline for the infer tasks (thread-safe).

    Args:
        options: the app's :class:`RunnerOptions`.
    """

    def __init__(self, options: RunnerOptions) -> None:
        self.options = options
        self._lock = threading.RLock()
        self._pipeline: CTCovidPipeline | None = None
        self._key: tuple | None = None
        self._error: str | None = None
        self._cache: OrderedDict[tuple, CTResult] = OrderedDict()

    # ------------------------------------------------------------------ weights
    @property
    def bundles_root(self) -> Path:
        from ctcovid.bundle import bundles_root

        return Path(self.options.bundle_dir) if self.options.bundle_dir else bundles_root()

    @property
    def finetuned_bundle(self) -> Path:
        """The fine-tuned lung segmenter bundle (written by the train task)."""
        return self.finetuned_bundle_of("segmentation")

    def finetuned_bundle_of(self, stage: str) -> Path:
        """Working copy of ``stage``'s bundle that the app's train task fine-tunes (:data:`TRAINABLE_STAGES`)."""
        return Path(self.options.model_dir) / DEFAULT_BUNDLES[stage]

    def finetuned_weights(self, stage: str = "segmentation") -> Path | None:
        w = self.finetuned_bundle_of(stage) / WEIGHTS_FILE
        return w if w.is_file() else None

    def segmentation_weights(self, stage: str = "segmentation") -> Path:
        """Weights ``stage`` uses: the fine-tuned ones when training produced them, else the bundle's."""
        return self.finetuned_weights(stage) or self.bundles_root / DEFAULT_BUNDLES[stage] / WEIGHTS_FILE

    def _weights_key(self) -> tuple:
        key = []
        paths = [self.bundles_root / b / WEIGHTS_FILE for b in DEFAULT_BUNDLES.values()]
        for p in [*paths, *(self.finetuned_bundle_of(s) / WEIGHTS_FILE for s in TRAINABLE_STAGES)]:
            try:
                st = p.stat()
                key.append((str(p), st.st_size, st.st_mtime_ns))
            except OSError:
                key.append((str(p), None, None))
        return tuple(key)

    # ------------------------------------------------------------------ pipeline
    def pipeline(self) -> CTCovidPipeline:
        """The pipeline for the current weights (built or rebuilt as needed).

        Raises:
            MissingWeightsError: the lung segmenter has no weights (neither fine-tuned nor shipped).
            BundleError: a bundle is missing or its checkpoint does not fit its network.
        """
        with self._lock:
            key = self._weights_key()
            if self._pipeline is None or key != self._key:
                # an absolute path as the bundle "name": load_stage joins it onto the root unchanged
                bundles = {
                    s: str(self.finetuned_bundle_of(s)) for s in TRAINABLE_STAGES if self.finetuned_weights(s)
                }
                logger.info(
                    "building the CT pipeline (bundles in %s, overrides %s)", self.bundles_root, bundles
                )
                self._pipeline = None
                try:
                    self._pipeline = CTCovidPipeline(
                        bundle_dir=self.options.bundle_dir,
                        device=self.options.device,
                        batch_size=self.options.batch_size,
                        precision=self.options.precision,
                        severity=self.options.severity,
                        skip_missing=True,
                        covid_threshold=self.options.covid_threshold,
                        gradcam=False,  # Slicer shows the mask; the heat map is for the montage of `ctcovid predict`
                        bundles=bundles,
                    )
                    self._error = None
                    self._cache.clear()
                except (MissingWeightsError, BundleError) as e:
                    self._error = str(e)
                    raise
                finally:
                    self._key = key
            return self._pipeline

    def run(self, path: str | os.PathLike) -> tuple[CTResult, bool]:
        """Run the pipeline on one study (NIfTI file or DICOM series folder) -> ``(result, from_cache)``.

        The result has the lung mask but not the normalised image (``result.image`` is ``None``).

        Raises:
            ctcovid.io.errors.CTInputError: unusable study (the message names the file and the problem).
            MissingWeightsError, BundleError: see :meth:`pipeline`.
        """
        with self._lock:
            pipeline = self.pipeline()
            key = (_study_key(path), self._key)
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key], True
            result = dataclasses.replace(pipeline(path), image=None, heatmap=None)
            if self.options.cache_size > 0:
                self._cache[key] = result
                while len(self._cache) > self.options.cache_size:
                    self._cache.popitem(last=False)
            return result, False

    # ------------------------------------------------------------------ reporting
    def status(self) -> dict[str, Any]:
        """Per stage ``{bundle, path, version, weights, message}`` without building any network (for ``/info/``)."""
        out: dict[str, Any] = {}
        for stage, bundle in DEFAULT_BUNDLES.items():
            info = bundle_weights_status(bundle, self.options.bundle_dir, with_hash=False)
            if stage in TRAINABLE_STAGES and self.finetuned_weights(stage) is not None:
                info["finetuned_weights"] = str(self.finetuned_weights(stage))
                info["weights"] = True
            if info.get("weights"):
                info["message"] = "trained weights loaded"
            elif stage == "slice_filter":
                info["message"] = "no trained weights: lung slices are chosen by lung-mask area instead"
            elif stage == "infection":
                info["message"] = (
                    f"no trained weights in {Path(info['path']) / WEIGHTS_FILE}: no lesion mask, involvement or "
                    "CT grade until the bundle is trained (or this app's training has produced weights)"
                )
            elif stage == "segmentation":
                info["message"] = (
                    f"no trained weights in {Path(info['path']) / WEIGHTS_FILE}: lung_segmentation cannot run "
                    "until the bundle is trained (or this app's training has produced weights)"
                )
            else:
                info["message"] = (
                    f"no trained weights shipped in {Path(info['path']) / WEIGHTS_FILE}: this model returns "
                    "null probabilities with the reason; train the bundle to enable it"
                )
            out[stage] = info
        if self._error:
            out["error"] = self._error
        return out


def _study_key(path: str | os.PathLike) -> tuple:
    """Identity of a study on disk: resolved path, size and modification time (of a folder's files too)."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError:
        return (str(p), None)  # the reader reports the missing path
    if not p.is_dir():
        return (str(p), st.st_size, st.st_mtime_ns)
    with os.scandir(p) as it:
        files = [(e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in it if e.is_file()]
    return (str(p), st.st_mtime_ns, tuple(sorted(files)))
