"""ctcovid MONAI Label app: the CT lung segmenter and the COVID-19 detection / severity models for 3D Slicer.

Start (loopback, offline: nothing is downloaded at start-up or later)::

    monailabel start_server --app "$(ctcovid label-app)" --studies /path/to/studies \
        --host 127.0.0.1 --port 8000 [--conf bundle_dir /path/to/bundles] [--conf severity always]

``--conf`` keys: ``bundle_dir`` (default ``$CTCOVID_BUNDLE_DIR`` or the source tree's ``bundles/``),
``model_dir`` (fine-tuned segmenter, default ``<app>/model``), ``device`` (``auto``), ``severity``
(``covid`` | ``always`` | ``never``), ``batch_size``, ``covid_threshold``.

Models: ``lung_segmentation`` and ``lung_infection_segmentation`` (segmentation, lung 1 / lesions 2; both
trainable from saved labels), ``covid_detection`` and ``covid_severity`` (classification, JSON). Bad requests are answered 4xx with a message: unknown model or image id (404; an
``image`` is only ever a study id of the datastore, never a server path: :mod:`ctcovid.label.access`), unusable
study or upload (415/422), a model whose weights are missing (503). The server has no authentication and no TLS:
see docs/monai_label_security.md for running it behind a reverse proxy that does both.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no code path may download weights

from fastapi import HTTPException  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402

import ctcovid  # noqa: E402
from ctcovid.ct.pipeline import DEFAULT_BUNDLES  # noqa: E402
from ctcovid.label.access import check_infer_image  # noqa: E402
from ctcovid.label.datastore import CTStudiesDatastore  # noqa: E402
from ctcovid.label.infer import (  # noqa: E402
    INFECTION_LABELS,
    CovidClassificationInfer,
    LungInfectionSegmentationInfer,
    LungSegmentationInfer,
)
from ctcovid.label.runner import PipelineRunner, RunnerOptions  # noqa: E402

logger = logging.getLogger(__name__)


class CTCovidLabelApp(MONAILabelApp):
    """MONAI Label app over :class:`ctcovid.ct.CTCovidPipeline` and the ``ct_lung_segmentation`` bundle."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        conf = dict(conf or {})
        self.options = RunnerOptions.from_conf(conf, app_dir)
        self.runner = PipelineRunner(self.options)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="ctcovid",
            description=(
                f"ctcovid {ctcovid.__version__}: lung and COVID-19 lesion segmentation of chest CT, lung involvement, "
                "COVID-19 detection and severity grading (research use; not a medical device)"
            ),
            version=ctcovid.__version__,
            labels=dict(INFECTION_LABELS),
        )

    # ------------------------------------------------------------------ MONAI Label hooks
    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()  # DICOMweb / XNAT / DSA as MONAI Label does
        logger.info("Init CT datastore for: %s", self.studies)
        return CTStudiesDatastore(
            self.studies,
            extensions=("*.nii.gz", "*.nii"),
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self):
        return {
            "lung_segmentation": LungSegmentationInfer(self.runner),
            "lung_infection_segmentation": LungInfectionSegmentationInfer(self.runner),
            "covid_detection": CovidClassificationInfer(self.runner, "detection"),
            "covid_severity": CovidClassificationInfer(self.runner, "severity"),
        }

    def init_trainers(self):
        from ctcovid.label.train import LungSegmentationTrain

        # a saved label map holds lung 1 and lesions 2: the lung model learns both as lung (lesions are lung
        # tissue), the lesion model only 2
        tasks = {
            "lung_segmentation": ("segmentation", tuple(INFECTION_LABELS.values())),
            "lung_infection_segmentation": ("infection", (INFECTION_LABELS["infection"],)),
        }
        out = {}
        self.train_unavailable = {}
        for name, (stage, values) in tasks.items():
            source = self.runner.bundles_root / DEFAULT_BUNDLES[stage]
            try:
                task = LungSegmentationTrain(source, self.runner.finetuned_bundle_of(stage), self.conf, values, name)
            except (OSError, ValueError) as e:  # no train config / metadata: serve inference only
                logger.warning("%s training is not available: %s", name, e)
                self.train_unavailable[name] = str(e)
                continue
            if task.is_valid():
                out[name] = task
        return out

    def init_strategies(self):
        return {"random": Random(), "first": First()}

    def info(self):
        meta = super().info()
        meta["ctcovid"] = {
            "version": ctcovid.__version__,
            "bundle_dir": str(self.runner.bundles_root),
            "model_dir": self.options.model_dir,
            "severity_mode": self.options.severity,
            "stages": self.runner.status(),
        }
        if getattr(self, "train_unavailable", None):  # per model: why it cannot be trained here
            meta["ctcovid"]["train_unavailable"] = self.train_unavailable
        return meta

    def infer(self, request, datastore=None):
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"unknown model {model!r}; this server has {sorted(self._infers)}"
            )
        ds = datastore or self.datastore()
        sessions = self.sessions()
        check_infer_image(request.get("image"), ds.list_images(), getattr(sessions, "store_path", None))
        return super().infer(request, datastore)

    def bundle_path(self, model):
        # called by MONAI Label before it starts a train / scoring / batch-infer task in the background:
        # the one place to refuse an unknown model with a 4xx instead of a failed background task
        if model is not None and model not in self._trainers and model not in self._infers:
            raise HTTPException(
                status_code=404,
                detail=f"unknown model {model!r}; trainable: {sorted(self._trainers)}, models: {sorted(self._infers)}",
            )
        return super().bundle_path(model)

    def on_save_label(self, image_id, label_id):
        logger.info(
            "label saved for %s (%s): train lung_segmentation / lung_infection_segmentation to use it", image_id, label_id
        )
        return {}
