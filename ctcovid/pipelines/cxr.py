"""The Cascade-SEME chest X-ray cascade as a plain Python object, and batch runs over image files.

Stage 1 (bundle ``cxr_pneumonia_type_classification``, SEME-ResNet50) gives ``P(normal, bacterial, viral)``.
An image whose viral probability is **above** the stored threshold ``Th_Vir`` (``models/viral_threshold.json``
of the stage-1 bundle, written by its ``configs/calibrate.json``: the mean viral probability over a
calibration set) goes on to stage 2 (bundle ``cxr_covid_viral_classification``, SEME-DenseNet169), which gives
``P(COVID-19, viral-other)``. Final label:

- passed the threshold: stage 2's arg-max, ``COVID-19`` or ``viral-other`` (the threshold, not stage 1's
  arg-max, decides "viral");
- did not pass: stage 1's arg-max over ``normal`` / ``bacterial``.

Grad-CAM (:mod:`ctcovid.visualize.gradcam`) explains the stage that gave the final label, for that label,
drawn over the original radiograph (shrunk to at most 1024 px).

:func:`run_cascade` runs many files: per image ``<id>.json`` and ``<id>_gradcam.png``, and ``summary.csv``
rewritten after each image (all written atomically). An unreadable image gets a ``failed`` row with the
reason and the run goes on. :func:`evaluate_cascade` scores the cascade on labelled images (4 classes).
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ctcovid.io.errors import CTInputError

from .bundles import MissingWeightsError, load_stage, weights_hash
from .cxr_eval import THRESHOLD_FILE_NAME, read_viral_threshold
from .outputs import write_csv_atomic, write_json_atomic

__all__ = [
    "STAGE1_BUNDLE",
    "STAGE2_BUNDLE",
    "FINAL_LABELS",
    "SUMMARY_FIELDS",
    "CascadeWeightsError",
    "CXRStage",
    "CXRCascade",
    "CXRResult",
    "CascadeRunReport",
    "require_weights",
    "run_cascade",
    "evaluate_cascade",
    "cascade_scores",
]

logger = logging.getLogger(__name__)

STAGE1_BUNDLE = "cxr_pneumonia_type_classification"
STAGE2_BUNDLE = "cxr_covid_viral_classification"
#: Final labels of the cascade, in the class order of :func:`evaluate_cascade`.
FINAL_LABELS = ("normal", "bacterial", "viral-other", "COVID-19")
SUMMARY_NAME = "summary.csv"
SUMMARY_FIELDS = (
    "id",
    "image",
    "status",
    "label",
    "p_normal",
    "p_bacterial",
    "p_viral",
    "viral_threshold",
    "passed_threshold",
    "p_covid19",
    "p_viral_other",
    "overlay_png",
    "reason",
)


class CascadeWeightsError(MissingWeightsError):
    """One or both cascade bundles have no trained weights (this project ships none for them)."""

    def __init__(self, missing: Sequence[tuple[str, str, Path]]):
        self.missing = list(missing)
        stage, bundle, bdir = self.missing[0]
        super().__init__(self._message(), bundle=bundle, stage=stage, bundle_dir=bdir)

    def _message(self) -> str:
        lines = ["the X-ray cascade cannot run: no trained weights for"]
        for stage, bundle, bdir in self.missing:
            lines.append(f"  - {stage} ({bundle}): {Path(bdir) / 'models' / 'model.pt'} is missing")
        lines.append(
            "No X-ray weights ship with ctcovid (SEME-ResNet50 ~95 MB, SE-DenseNet169 ~50 MB). Train each bundle "
            "with `python -m monai.bundle run --config_file <bundle>/configs/train.json`, then calibrate the "
            "viral threshold with `ctcovid cxr calibrate` (see the bundles' docs/README.md)."
        )
        return "\n".join(lines)


def require_weights(path: str | os.PathLike, bundle_name: str, allow_random_weights: bool = False) -> bool:
    """:func:`ctcovid.handlers.require_checkpoint` under the name the X-ray bundle configs use
    (``"_disabled_": "$not ctcovid.pipelines.cxr.require_weights(...)"`` on a ``CheckpointLoader``).

    Raises:
        ctcovid.handlers.MissingWeightsError: no file at ``path`` and ``allow_random_weights`` is False.
    """
    from ctcovid.handlers.checkpoint import require_checkpoint

    return require_checkpoint(path, bundle_name, allow_random_weights)


def _trained_size(bundle_dir: Path) -> list[int] | None:
    """``spatial_size`` recorded in ``models/train_info.json`` by the bundle's training, if any."""
    info = Path(bundle_dir) / "models" / "train_info.json"
    try:
        size = json.loads(info.read_text(encoding="utf-8")).get("spatial_size")
    except (OSError, ValueError, AttributeError):
        return None
    return [int(v) for v in size] if isinstance(size, list) and len(size) == 2 else None


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use --device cpu or auto)")
    return dev


class CXRStage:
    """One classifier of the cascade: network, preprocessing and class names.

    Args:
        network: ``(1, C, H, W)`` -> logits ``(1, K)``; put in eval mode.
        class_names: the ``K`` class names.
        transform: maps ``{"image": (1, H, W) MetaTensor in [0, 1]}`` to ``{"image": (C, h, w)}`` (a bundle's
            preprocessing without its loader). Default: resize to ``spatial_size`` (bilinear, anti-aliased) and
            repeat the grey channel to the network's ``in_channels`` -- the bundles' own preprocessing.
        spatial_size: network input size for the default transform.
        device: where the network runs.
        gradcam_layer: module name for Grad-CAM (default: ``network.gradcam_layer``).
        name: stage name for messages; ``provenance``: JSON facts stored with results (bundle, weights hash).
    """

    def __init__(
        self,
        network: nn.Module,
        class_names: Sequence[str],
        transform: Callable[[dict], dict] | None = None,
        spatial_size: Sequence[int] = (512, 512),
        device: str | torch.device = "cpu",
        gradcam_layer: str | None = None,
        name: str = "",
        provenance: dict | None = None,
    ) -> None:
        self.device = _resolve_device(device)
        self.network = network.to(self.device).eval()
        self.class_names = [str(c) for c in class_names]
        self.spatial_size = [int(s) for s in spatial_size]
        self.transform = transform if transform is not None else self._default_transform()
        self.gradcam_layer = gradcam_layer or getattr(network, "gradcam_layer", None)
        self.name = name
        self.provenance = dict(provenance or {})

    def _default_transform(self) -> Callable[[dict], dict]:
        from monai.transforms import Compose, EnsureTyped, RepeatChanneld, Resized

        repeats = int(getattr(self.network, "in_channels", 3))
        steps = [Resized("image", self.spatial_size, mode="bilinear", anti_aliasing=True)]
        if repeats > 1:
            steps.append(RepeatChanneld("image", repeats=repeats))
        steps.append(EnsureTyped("image", dtype=torch.float32))
        return Compose(steps)

    @classmethod
    def from_bundle(
        cls,
        stage: str,
        bundle: str,
        bundle_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        spatial_size: Sequence[int] | None = None,
    ) -> CXRStage:
        """Build from a bundle's ``inference.json`` (network, preprocessing minus the loader, class names)
        and ``models/model.pt``. Input size: ``spatial_size`` if given, else the size the weights were trained
        at (``models/train_info.json``, written by ``train.json``), else the config's ``spatial_size``.

        Raises ``ctcovid.pipelines.bundles.MissingWeightsError`` when the weights are absent.
        """
        from monai.transforms import Compose

        from ctcovid.io import LoadXRayd

        dev = _resolve_device(device)
        sm = load_stage(stage, bundle, bundle_dir, device=dev)
        cfg = sm.config
        size = spatial_size or _trained_size(sm.bundle_dir)
        if size is not None:
            cfg["spatial_size"] = [int(s) for s in size]
        else:
            size = cfg.get_parsed_content("spatial_size") if "spatial_size" in cfg else (sm.input_shape() or [512, 512])
        pre = cfg.get_parsed_content("preprocessing")
        steps = [t for t in pre.transforms if not isinstance(t, LoadXRayd)]
        return cls(
            sm.network,
            sm.channel_names(),
            transform=Compose(steps),
            spatial_size=size,
            device=dev,
            name=stage,
            provenance={**sm.provenance(), "spatial_size": [int(s) for s in size]},
        )

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """``(1, H, W)`` grey image in [0, 1] -> ``(1, C, h, w)`` float32 network input on the device."""
        out = self.transform({"image": image})["image"]
        x = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
        return x[None].float().to(self.device)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        """Softmax probabilities ``(K,)`` for a ``(1, C, h, w)`` input."""
        logits = self.network(x)
        if logits.ndim != 2 or logits.shape != (1, len(self.class_names)):
            raise RuntimeError(f"{self.name}: network output {tuple(logits.shape)}, expected (1, {len(self.class_names)})")
        return torch.softmax(logits.float(), dim=1)[0].cpu().numpy().astype(np.float64)


@dataclass
class CXRResult:
    """The cascade's answer for one image (JSON-ready via :meth:`to_dict`)."""

    image: str
    status: str = "ok"
    reason: str = ""
    stage1_probabilities: dict[str, float] = field(default_factory=dict)
    viral_probability: float | None = None
    viral_threshold: float | None = None
    passed_threshold: bool | None = None
    stage2_probabilities: dict[str, float] | None = None
    label: str | None = None
    decided_by: str | None = None
    overlay_png: str | None = None
    gradcam: dict | None = None
    models: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_row(self, image_id: str) -> dict:
        s1, s2 = self.stage1_probabilities or {}, self.stage2_probabilities or {}
        return {
            "id": image_id,
            "image": self.image,
            "status": self.status,
            "label": self.label or "",
            "p_normal": _fmt(s1.get("normal")),
            "p_bacterial": _fmt(s1.get("bacterial")),
            "p_viral": _fmt(s1.get("viral")),
            "viral_threshold": _fmt(self.viral_threshold),
            "passed_threshold": "" if self.passed_threshold is None else str(self.passed_threshold).lower(),
            "p_covid19": _fmt(s2.get("COVID-19")),
            "p_viral_other": _fmt(s2.get("viral-other")),
            "overlay_png": self.overlay_png or "",
            "reason": self.reason,
        }


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


class CXRCascade:
    """Cascade-SEME: stage 1 (normal / bacterial / viral), stored viral threshold, stage 2 (COVID-19 / other).

    Args:
        stage1: stage-1 classifier; its classes must include ``normal``, ``bacterial`` and ``viral``.
        stage2: stage-2 classifier; classes ``COVID-19`` and ``viral-other``.
        threshold: ``Th_Vir`` as a float, or the record of :func:`ctcovid.pipelines.cxr_eval.read_viral_threshold`.

    Use :meth:`from_bundles` to load the two bundles and the stored threshold.
    """

    def __init__(self, stage1: CXRStage, stage2: CXRStage, threshold: float | dict) -> None:
        self.stage1, self.stage2 = stage1, stage2
        record = dict(threshold) if isinstance(threshold, dict) else {"viral_threshold": float(threshold)}
        self.threshold = float(record["viral_threshold"])
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"viral threshold {self.threshold} is not a probability")
        self.threshold_record = record
        for needed in ("normal", "bacterial", "viral"):
            if needed not in stage1.class_names:
                raise ValueError(f"stage 1 classes {stage1.class_names} lack {needed!r}")
        for needed in ("COVID-19", "viral-other"):
            if needed not in stage2.class_names:
                raise ValueError(f"stage 2 classes {stage2.class_names} lack {needed!r}")
        self.viral_index = stage1.class_names.index("viral")
        self.warnings: list[str] = []

    @classmethod
    def from_bundles(
        cls,
        bundle_dir: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        threshold_file: str | os.PathLike | None = None,
        spatial_size: Sequence[int] | None = None,
        stage2_spatial_size: Sequence[int] | None = None,
    ) -> CXRCascade:
        """Load both bundles (from ``bundle_dir``, default ``bundles/``) and the stored threshold.

        Args:
            bundle_dir: folder holding both bundles.
            device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:0"``, ...
            threshold_file: default ``<stage-1 bundle>/models/viral_threshold.json``.
            spatial_size: stage-1 input size (default: the size its weights were trained at, from
                ``models/train_info.json``, else the config's 512x512).
            stage2_spatial_size: stage-2 input size (default: ``spatial_size`` if given, else as for stage 1).

        Raises:
            CascadeWeightsError: a bundle has no ``models/model.pt`` (names both when both are missing).
            ctcovid.pipelines.cxr_eval.ThresholdFileError: no or a malformed threshold file.
        """
        from ctcovid.bundle import bundles_root

        root = Path(bundle_dir).expanduser().resolve() if bundle_dir is not None else bundles_root()
        missing = [
            (stage, bundle, root / bundle)
            for stage, bundle in (("stage 1", STAGE1_BUNDLE), ("stage 2", STAGE2_BUNDLE))
            if not (root / bundle / "models" / "model.pt").is_file()
        ]
        if missing:
            raise CascadeWeightsError(missing)
        tfile = Path(threshold_file) if threshold_file else root / STAGE1_BUNDLE / "models" / THRESHOLD_FILE_NAME
        record = read_viral_threshold(tfile)
        record["file"] = str(tfile)
        s1 = CXRStage.from_bundle("stage 1", STAGE1_BUNDLE, root, device, spatial_size)
        s2 = CXRStage.from_bundle("stage 2", STAGE2_BUNDLE, root, device, stage2_spatial_size or spatial_size)
        cascade = cls(s1, s2, record)
        calibrated = record.get("spatial_size")
        if calibrated and [int(v) for v in calibrated] != s1.spatial_size:
            cascade.warnings.append(
                f"{tfile} was calibrated at input size {calibrated} but stage 1 runs at {s1.spatial_size}"
            )
        sha = record.get("model_sha256")
        if sha and sha != weights_hash(root / STAGE1_BUNDLE / "models" / "model.pt"):
            cascade.warnings.append(
                f"{tfile} was calibrated for other stage-1 weights (sha256 {sha[:12]}...); re-run the calibration"
            )
        for w in cascade.warnings:
            logger.warning(w)
        return cascade

    def models(self) -> dict:
        return {
            "stage1": self.stage1.provenance,
            "stage2": self.stage2.provenance,
            "viral_threshold": {k: v for k, v in self.threshold_record.items() if k != "class_counts"},
        }

    def predict(
        self,
        path: str | os.PathLike,
        overlay_path: str | os.PathLike | None = None,
        stage2_for_all: bool = False,
    ) -> CXRResult:
        """Run the cascade on one image file.

        Args:
            path: PNG / JPEG / DICOM radiograph.
            overlay_path: where to write the Grad-CAM overlay PNG (``None``: no Grad-CAM).
            stage2_for_all: also run stage 2 on images below the threshold (evaluation scores only; the label
                still follows the threshold). Their stage-2 probabilities are then reported too.

        Raises:
            CTInputError: the image cannot be read (the message names the file and the problem).
        """
        from ctcovid.io import load_xray

        image = load_xray(path)
        x1 = self.stage1.preprocess(image)
        p1 = self.stage1.probabilities(x1)
        pv = float(p1[self.viral_index])
        passed = pv > self.threshold
        result = CXRResult(
            image=str(path),
            stage1_probabilities=dict(zip(self.stage1.class_names, map(float, p1))),
            viral_probability=pv,
            viral_threshold=self.threshold,
            passed_threshold=passed,
            models=self.models(),
        )
        x2 = None
        if passed or stage2_for_all:
            x2 = self.stage2.preprocess(image)
            p2 = self.stage2.probabilities(x2)
            result.stage2_probabilities = dict(zip(self.stage2.class_names, map(float, p2)))
        if passed:
            k = int(np.argmax(p2))
            result.label, result.decided_by = self.stage2.class_names[k], "stage 2"
            stage, x, class_index = self.stage2, x2, k
        else:
            candidates = [self.stage1.class_names.index(c) for c in ("normal", "bacterial")]
            k = max(candidates, key=lambda i: p1[i])
            result.label, result.decided_by = self.stage1.class_names[k], "stage 1"
            stage, x, class_index = self.stage1, x1, k
        if overlay_path is not None:
            result.overlay_png = str(self._gradcam(stage, x, class_index, overlay_path, image))
            result.gradcam = {"stage": stage.name, "class": stage.class_names[class_index], "layer": stage.gradcam_layer}
        return result

    #: Longest side of the Grad-CAM overlay PNG (the radiograph is shrunk to it, never enlarged).
    overlay_max_side = 1024

    def _gradcam(
        self, stage: CXRStage, x: torch.Tensor, class_index: int, path: str | os.PathLike, image: torch.Tensor
    ) -> Path:
        """Grad-CAM of ``stage`` for ``class_index`` over the original radiograph, written as PNG."""
        from ctcovid.visualize.gradcam import gradcam_heatmap, overlay_heatmap, save_png_atomic

        if not stage.gradcam_layer:
            raise RuntimeError(f"{stage.name}: network has no gradcam_layer to explain")
        heat = gradcam_heatmap(stage.network, x, stage.gradcam_layer, class_index=class_index)
        grey = np.asarray(image[0].detach().cpu().numpy(), dtype=np.float32)
        scale = self.overlay_max_side / max(grey.shape)
        if scale < 1:
            from skimage.transform import resize

            shape = (max(1, round(grey.shape[0] * scale)), max(1, round(grey.shape[1] * scale)))
            grey = resize(grey, shape, order=1, anti_aliasing=True, preserve_range=True)
        return save_png_atomic(overlay_heatmap(grey, heat), path)


@dataclass
class CascadeRunReport:
    """What :func:`run_cascade` did: one summary row per input, in input order."""

    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r["status"] == "failed")

    @property
    def ok(self) -> int:
        return sum(1 for r in self.rows if r["status"] == "ok")

    @property
    def summary_path(self) -> Path:
        return self.out_dir / SUMMARY_NAME


def _unique_ids(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique with ``_2``, ``_3`` ... (two ``image.png`` from different folders)."""
    seen: dict[str, int] = {}
    ids = []
    for p in paths:
        stem = p.name
        for suffix in (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        ids.append(stem if n == 1 else f"{stem}_{n}")
    return ids


def run_cascade(
    cascade: CXRCascade,
    images: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    gradcam: bool = True,
    progress: Callable[[int, int, dict], None] | None = None,
) -> CascadeRunReport:
    """Run the cascade over image files, writing ``<id>.json``, ``<id>_gradcam.png`` and ``summary.csv``.

    A file that cannot be read (any :class:`~ctcovid.io.errors.CTInputError`) or that fails in the networks
    gets ``status = "failed"`` and the reason, in its JSON and its summary row; the run goes on.
    ``summary.csv`` is rewritten (atomically) after every image.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in images]
    report = CascadeRunReport(out)
    for i, (path, image_id) in enumerate(zip(paths, _unique_ids(paths))):
        overlay = out / f"{image_id}_gradcam.png" if gradcam else None
        try:
            result = cascade.predict(path, overlay_path=overlay)
        except CTInputError as e:
            result = CXRResult(image=str(path), status="failed", reason=str(e), models=cascade.models())
        except Exception as e:  # a network/transform failure on one image must not end the run
            logger.error("cascade failed on %s:\n%s", path, traceback.format_exc())
            result = CXRResult(image=str(path), status="failed", reason=f"{type(e).__name__}: {e}",
                               models=cascade.models())
        if result.overlay_png:
            result.overlay_png = Path(result.overlay_png).name
        record = {"id": image_id, **result.to_dict(), "warnings": list(cascade.warnings)}
        write_json_atomic(record, out / f"{image_id}.json")
        report.rows.append(result.summary_row(image_id))
        write_csv_atomic(report.rows, SUMMARY_FIELDS, report.summary_path)
        if progress is not None:
            progress(i + 1, len(paths), report.rows[-1])
    if not paths:
        write_csv_atomic([], SUMMARY_FIELDS, report.summary_path)
    return report


def cascade_scores(result: CXRResult) -> np.ndarray:
    """Continuous 4-class scores ``[p_normal, p_bacterial, p_viral * q_other, p_viral * q_covid]``.

    ``q`` are stage 2's probabilities, so ``result`` must come from ``predict(..., stage2_for_all=True)``.
    Used only for ROC/AUC; the cascade's decision (the threshold) gives the labels.
    """
    s1, s2 = result.stage1_probabilities, result.stage2_probabilities
    if s2 is None:
        raise ValueError(f"{result.image}: no stage-2 probabilities (predict with stage2_for_all=True)")
    pv = s1["viral"]
    return np.array([s1["normal"], s1["bacterial"], pv * s2["viral-other"], pv * s2["COVID-19"]], dtype=np.float64)


def evaluate_cascade(
    cascade: CXRCascade,
    items: Sequence[dict],
    out_dir: str | os.PathLike,
    title: str = "cascade",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Evaluate the whole cascade on labelled images (4 classes: :data:`FINAL_LABELS`).

    Args:
        cascade: the cascade.
        items: dicts with ``image`` (path) and ``label`` (a name from :data:`FINAL_LABELS` or its index).
        out_dir: gets ``report.json``, ``predictions.csv``, ``confusion_matrix.png``, ``roc.png``.
        title: figure title prefix.
        progress: called as ``progress(done, total)`` before each image.

    Sensitivity, specificity, precision, F1, accuracy and the confusion matrix are those of the cascade's
    decisions (threshold included). AUC and the ROC curves rank the continuous scores of
    :func:`cascade_scores` (stage 2 run on every image for that purpose only). Unreadable images are listed
    under ``failed`` and left out.
    """
    from ctcovid.metrics.classification import classification_report

    from .cxr_eval import write_evaluation_figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels, scores, decisions, names, failed = [], [], [], [], []
    for i, it in enumerate(items):
        if progress is not None:
            progress(i, len(items))
        y = it["label"] if isinstance(it["label"], int) else FINAL_LABELS.index(it["label"])
        try:
            r = cascade.predict(it["image"], stage2_for_all=True)
        except CTInputError as e:
            failed.append({"image": str(it["image"]), "reason": str(e)})
            continue
        labels.append(y)
        scores.append(cascade_scores(r))
        decisions.append(FINAL_LABELS.index(r.label))
        names.append(str(it.get("name", it["image"])))
    t = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1, len(FINAL_LABELS))
    onehot = np.eye(len(FINAL_LABELS))[np.asarray(decisions, dtype=np.int64)]
    report = classification_report(t, onehot, FINAL_LABELS)
    ranked = classification_report(t, s, FINAL_LABELS)
    for c in FINAL_LABELS:
        report["per_class"][c]["auc"] = ranked["per_class"][c]["auc"]
    report["macro"]["auc"] = ranked["macro"]["auc"]
    report["class_balance"] = {c: int((t == i).sum()) for i, c in enumerate(FINAL_LABELS)}
    report["viral_threshold"] = cascade.threshold
    report["passed_threshold"] = int(sum(1 for d in decisions if FINAL_LABELS[d] in ("viral-other", "COVID-19")))
    report["notes"] = (
        "labels = cascade decisions (stage 1, viral threshold, stage 2); AUC/ROC rank the scores "
        "[p_normal, p_bacterial, p_viral*q_viral-other, p_viral*q_COVID-19] with stage 2 run on every image"
    )
    report["failed"] = failed
    report["models"] = cascade.models()
    report["figures"] = write_evaluation_figures(report, t, s, out, title)
    rows = [
        {"image": n, "true": FINAL_LABELS[ti], "predicted": FINAL_LABELS[di],
         **{f"score_{c}": f"{v:.6f}" for c, v in zip(FINAL_LABELS, si)}}
        for n, ti, di, si in zip(names, t, decisions, s)
    ]
    write_csv_atomic(rows, ["image", "true", "predicted", *[f"score_{c}" for c in FINAL_LABELS]], out / "predictions.csv")
    write_json_atomic(report, out / "report.json")
    return report
