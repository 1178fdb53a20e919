"""Fine-tuning the lung and lesion segmenters from the labels saved in the datastore (MONAI Label's train
endpoint).

:class:`LungSegmentationTrain` is MONAI Label's :class:`~monailabel.tasks.train.bundle.BundleTrainTask` over
a slice-segmentation bundle's own ``configs/train.json`` (``ct_lung_segmentation`` or
``ct_lung_infection_segmentation``), with two differences:

- it trains a *working copy* of the bundle under the app's model dir (``<model_dir>/ct_lung_segmentation``,
  configs copied from the shipped bundle at start-up), so a few corrected labels never overwrite the
  shipped weights; it starts from the working copy's weights if training ran before, else from the shipped
  weights, else (said in the log) from random initialisation;
- the bundle trains on 2D slices cut from whole volumes (``ctcovid.training.lung_slice_items``), so the
  datastore's ``{image, label}`` volumes replace the bundle's datalist (``train#items`` /
  ``validate#items``), not ``train#dataset#data``.

With a single labelled volume, validation (model selection: the key-metric checkpoint) uses that same
volume; the stats say so. The infer tasks pick the new weights up on their next request.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.train.bundle import BundleTrainTask

__all__ = ["LungSegmentationTrain", "sync_bundle_configs"]

logger = logging.getLogger(__name__)

STATS_FILE = "train_stats.json"

#: Slice items from the datastore volumes, as the bundle's own datalist items are made.
_ITEMS = (
    "$ctcovid.training.lung_slice_items(@{key}#volumes, spatial_size=@spatial_size, "
    "max_slices_per_item=@max_slices_per_item)"
)
#: Request parameters passed on as bundle config overrides (name -> type).
_TUNABLE = {
    "max_slices_per_item": int,
    "batch_size": int,
    "epoch_length": int,
    "learning_rate": float,
    "val_interval": int,
    "seed": int,
}


def sync_bundle_configs(source: Path, work: Path) -> None:
    """Copy ``source/configs`` (and its docs) into the working bundle ``work``; ``work/models`` is kept."""
    if not (source / "configs" / "train.json").is_file():
        raise FileNotFoundError(f"{source}: no configs/train.json to train with")
    (work / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / "configs", work / "configs", dirs_exist_ok=True)
    if (source / "docs").is_dir():
        shutil.copytree(source / "docs", work / "docs", dirs_exist_ok=True)


class LungSegmentationTrain(BundleTrainTask):
    """Train task of ``lung_segmentation``.

    Args:
        source_bundle: the shipped ``ct_lung_segmentation`` bundle.
        work_bundle: its working copy under the app's model dir (configs synced here, weights written here).
        conf: the app's ``conf``.
        label_values: values of the saved labels that are foreground for this model (lung: ``(1, 2)``, the
            lung with its lesions; lesions: ``(2,)``; see :data:`ctcovid.label.infer.INFECTION_LABELS`).
        name: the task's model name (messages and logs).
    """

    def __init__(
        self,
        source_bundle: str | os.PathLike,
        work_bundle: str | os.PathLike,
        conf: dict,
        label_values: int | Sequence[int] = 1,
        name: str = "lung_segmentation",
    ) -> None:
        self.source_bundle = Path(source_bundle)
        self.work_bundle = Path(work_bundle)
        values = [label_values] if isinstance(label_values, int) else label_values
        self.label_values = [int(v) for v in values]
        self.name = name
        self._request: dict = {}
        self._run_stats: dict[str, Any] = {}
        sync_bundle_configs(self.source_bundle, self.work_bundle)
        super().__init__(str(self.work_bundle), conf, load_strict=True)
        if self.is_valid():
            self.description = (
                f"Fine-tune {self.name} on the images with a final label in the datastore "
                f"(bundle {self.source_bundle.name}; weights go to {self.work_bundle / 'models'})"
            )

    # ------------------------------------------------------------------ MONAI Label hooks
    def config(self) -> dict[str, Any]:
        c = super().config()
        # CPU-sized defaults; the Slicer module shows and sends these
        c.update({"max_epochs": 10, "max_slices_per_item": 32, "batch_size": 8, "val_split": 0.2})
        for k in ("multi_gpu", "gpus", "tracking", "tracking_uri", "tracking_experiment_name", "run_id"):
            c.pop(k, None)
        return c

    def stats(self) -> dict[str, Any]:
        f = self.work_bundle / STATS_FILE
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def __call__(self, request, datastore):
        self._request = dict(request)
        # never use multi-GPU torchrun (no multi_gpu_train override of the slice datalist)
        request = {**request, "multi_gpu": False, "tracking": "None"}
        if not self._fetch_datalist(request, datastore):
            raise MONAILabelException(
                MONAILabelError.APP_TRAIN_FAILED,
                f"no labelled images: save a corrected label (PUT /datastore/label, tag final) before training {self.name}",
            )
        start = time.time()
        out = super().__call__(request, datastore)
        stats = {
            **self._run_stats,
            "total_time": round(time.time() - start, 1),
            "start_ts": int(start),
            "weights": str(self.work_bundle / "models" / "model.pt"),
        }
        _write_json(self.work_bundle / STATS_FILE, stats)
        logger.info("%s training finished: %s", self.name, stats)
        return {**(out or {}), **stats}

    def _fetch_datalist(self, request, datastore):
        items = super()._fetch_datalist(request, datastore)
        return [
            {**d, "label_values": list(self.label_values), "case": Path(d["image"]).name.split(".")[0]} for d in items
        ]

    def _partition_datalist(self, datalist, request, shuffle=False):
        if len(datalist) < 2 or float(request.get("val_split", 0.2)) <= 0:
            logger.warning("%d labelled image(s): validating on the training images", len(datalist))
            train, val = list(datalist), list(datalist)
        else:
            train, val = super()._partition_datalist(datalist, request, shuffle=shuffle)
            if not val:
                train, val = list(datalist), list(datalist)
        self._run_stats = {
            "labelled_images": len(datalist),
            "train_images": [d["case"] for d in train],
            "validation_images": [d["case"] for d in val],
            "validation_on_training_images": train == val,
        }
        return train, val

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        start = model_pytorch
        if pretrained and not os.path.exists(start):
            shipped = self.source_bundle / "models" / "model.pt"
            start = str(shipped) if shipped.is_file() else start
        if pretrained and os.path.exists(start):
            self._run_stats["initialised_from"] = start
            super()._load_checkpoint(start, pretrained, train_handlers)
        else:
            self._run_stats["initialised_from"] = "random initialisation (no weights to start from)"
            logger.warning("%s: training from random initialisation (no weights in %s)", self.name, model_pytorch)

    def _update_overrides(self, overrides):
        train = overrides.pop(self.const.key_train_dataset_data())
        val = overrides.pop(self.const.key_validate_dataset_data(), None) or train
        overrides.update(
            {
                "train#volumes": train,
                "validate#volumes": val,
                "train#items": _ITEMS.format(key="train"),
                "validate#items": _ITEMS.format(key="validate"),
                "num_workers": 0,
                # checkpoints into the working copy, whatever the shipped config trains into
                "ckpt_dir": "$@bundle_root + '/models'",
                "output_dir": "$@bundle_root + '/eval'",
                "init_ckpt": None,
            }
        )
        for key, cast in _TUNABLE.items():
            value = self._request.get(key)
            if value not in (None, ""):
                overrides[key] = cast(value) if not (key == "max_slices_per_item" and int(value) <= 0) else None
        return overrides

    def run_single_gpu(self, request, overrides):
        """Run ``configs/train.json`` with the overrides (as MONAI Label does) and keep the key metric."""
        from monai.bundle import ConfigWorkflow

        workflow = ConfigWorkflow(
            config_file=self.bundle_config_path,
            meta_file=self.bundle_metadata_path,
            logging_file=False,  # keep MONAI Label's logging (the task log the server shows)
            workflow_type="train",
            **overrides,
        )
        workflow.initialize()
        workflow.run()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        self._run_stats.update(
            {
                "epochs": int(trainer.state.epoch),
                "best_metric": _finite(evaluator.state.best_metric),
                "best_metric_epoch": int(evaluator.state.best_metric_epoch),
                "key_metric": "val_mean_dice",
            }
        )
        workflow.finalize()


def _finite(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if v == v and abs(v) != float("inf") else None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
