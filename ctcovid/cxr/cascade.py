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

A stage 1 trained on films cropped to the lungs' bounding box (``configs/train_lungbox.json``) crops the same way
in its own ``inference.json`` preprocessing (X-ray lung segmenter, then the box): the box is kept in the result
(``stage1_lung_box``) and stage 1's Grad-CAM is drawn inside it on the whole film.

:func:`ctcovid.cxr.runs.run_cascade` runs many files: per image ``<id>.json`` and ``<id>_gradcam.png``, and ``summary.csv``
rewritten after each image (all written atomically). An unreadable image gets a ``failed`` row with the
reason and the run goes on. :func:`ctcovid.cxr.runs.evaluate_cascade` scores the cascade on labelled images (4 classes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ctcovid.bundle.loading import weights_hash

from .evaluation import THRESHOLD_FILE_NAME, read_viral_threshold
from .result import CXRResult
from .stage import CascadeWeightsError, CXRStage

__all__ = ["STAGE1_BUNDLE", "STAGE2_BUNDLE", "CXRCascade"]

logger = logging.getLogger(__name__)

STAGE1_BUNDLE = "cxr_pneumonia_type_classification"
STAGE2_BUNDLE = "cxr_covid_viral_classification"


class CXRCascade:
    """Cascade-SEME: stage 1 (normal / bacterial / viral), stored viral threshold, stage 2 (COVID-19 / other).

    Args:
        stage1: stage-1 classifier; its classes must include ``normal``, ``bacterial`` and ``viral``.
        stage2: stage-2 classifier; classes ``COVID-19`` and ``viral-other``.
        threshold: ``Th_Vir`` as a float, or the record of :func:`ctcovid.cxr.evaluation.read_viral_threshold`.

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
            ctcovid.cxr.evaluation.ThresholdFileError: no or a malformed threshold file.
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
        image: torch.Tensor | None = None,
    ) -> CXRResult:
        """Run the cascade on one image file.

        Args:
            path: PNG / JPEG / DICOM radiograph.
            overlay_path: where to write the Grad-CAM overlay PNG (``None``: no Grad-CAM).
            stage2_for_all: also run stage 2 on images below the threshold (evaluation scores only; the label
                still follows the threshold). Their stage-2 probabilities are then reported too.
            image: ``path`` already read with :func:`ctcovid.io.load_xray` (a batch run reads ahead).

        Raises:
            CTInputError: the image cannot be read (the message names the file and the problem).
        """
        from ctcovid.io import load_xray

        image = load_xray(path) if image is None else image
        x1, box = self.stage1.prepare(image)
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
            stage1_lung_box=box,
        )
        x2, heat = None, None
        if passed or stage2_for_all:
            x2 = self.stage2.preprocess(image)
            if passed and overlay_path is not None and self.stage2.gradcam_layer:
                # stage 2 decides and is explained for its predicted class (= the label): one forward gives both
                from ctcovid.visualize.gradcam import gradcam_with_logits

                heat, logits = gradcam_with_logits(self.stage2.network, x2, self.stage2.gradcam_layer)
                p2 = self.stage2.softmax(logits)
            else:
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
            where = box if stage is self.stage1 else None
            result.overlay_png = str(self._gradcam(stage, x, class_index, overlay_path, image, heat, where))
            result.gradcam = {"stage": stage.name, "class": stage.class_names[class_index], "layer": stage.gradcam_layer}
        return result

    #: Longest side of the Grad-CAM overlay PNG (the radiograph is shrunk to it, never enlarged).
    overlay_max_side = 1024

    def _gradcam(
        self,
        stage: CXRStage,
        x: torch.Tensor,
        class_index: int,
        path: str | os.PathLike,
        image: torch.Tensor,
        heat: np.ndarray | None = None,
        box: Sequence[int] | None = None,
    ) -> Path:
        """Grad-CAM of ``stage`` for ``class_index`` (``heat``: already computed) over the radiograph, as PNG;
        ``box`` ``(r0, r1, c0, c1)``: the map was made on that crop of the radiograph (zero outside it)."""
        from ctcovid.visualize.gradcam import gradcam_heatmap, overlay_heatmap, paste_heatmap, save_png_atomic

        if not stage.gradcam_layer:
            raise RuntimeError(f"{stage.name}: network has no gradcam_layer to explain")
        if heat is None:
            heat = gradcam_heatmap(stage.network, x, stage.gradcam_layer, class_index=class_index)
        grey = np.asarray(image[0].detach().cpu().numpy(), dtype=np.float32)
        scale = self.overlay_max_side / max(grey.shape)
        if scale < 1:
            from skimage.transform import resize

            shape = (max(1, round(grey.shape[0] * scale)), max(1, round(grey.shape[1] * scale)))
            grey = resize(grey, shape, order=1, anti_aliasing=True, preserve_range=True)
        if box is not None:
            heat = paste_heatmap(heat, box, image.shape[1:], grey.shape)
        return save_png_atomic(overlay_heatmap(grey, heat), path)
