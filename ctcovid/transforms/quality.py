"""Image-quality filters for data curation (V-BreathNet) and class balancing by augmentation.

Quality (array transform :class:`ImageQualityFilter`, dictionary twin :class:`ImageQualityFilterd`):

- **blur**: the variance of the Laplacian of the image is low when edges are soft. Measured on the image
  brought to ``analysis_size`` x ``analysis_size`` (area averaging when shrinking, bilinear when growing) on
  a 0-255 intensity scale with the 4-neighbour kernel (OpenCV's ``cv2.Laplacian`` with ``ksize=1``), so one
  threshold fits every resolution. Rejected when ``< blur_threshold``.
- **contrast**: RMS contrast, the standard deviation of the ``[0, 1]`` intensities at the analysis size.
  Rejected when below ``contrast_range[0]`` (washed-out, faded) or above ``contrast_range[1]`` (near
  binary, large black borders).

Defaults were set on the real radiographs of ``../shared/data/cxr`` (3000 Kermany + 371 ieee8023
frontal images, 224x224 analysis): the variance of the Laplacian has minimum 8.2, 1st percentile 21.7 and
median 117, while Gaussian-blurred copies (sigma = 2 px at 224) have median 2.6 and maximum 10.8. RMS contrast
lies in 0.057-0.366 (1st-99th percentile 0.093-0.305). ``blur_threshold=15`` rejects 4 of the 3371 real images
(visibly soft ones) and every blurred copy; ``contrast_range=(0.07, 0.33)`` rejects 11 faded and 2 near-binary
images (numbers and file names in the V-BreathNet bundle's docs).

:func:`curate` applies a filter to a datalist and returns what was kept and what was removed, with the
reasons; :func:`write_curation_report` writes that as CSV. Class balancing: :func:`balance_by_augmentation`
tops every class up to the largest class with flagged copies, and :class:`AugmentCopiesd` applies a random
augmentation to exactly those copies, so each copy becomes a new augmented image.
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform
from scipy import ndimage

from ctcovid.io.errors import CTInputError, ImageQualityError

__all__ = [
    "QualityAssessment",
    "laplacian_variance",
    "rms_contrast",
    "ImageQualityFilter",
    "ImageQualityFilterd",
    "CurationReport",
    "curate",
    "write_curation_report",
    "balance_by_augmentation",
    "AugmentCopiesd",
    "DEFAULT_BLUR_THRESHOLD",
    "DEFAULT_CONTRAST_RANGE",
]

DEFAULT_BLUR_THRESHOLD = 15.0
DEFAULT_CONTRAST_RANGE = (0.07, 0.33)
#: Key of the copy index written by :func:`balance_by_augmentation` (0 = the original image).
COPY_KEY = "aug_copy"


def _as_2d(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(H, W)`` or ``(C, H, W)`` image -> ``(H, W)`` float64 (channels averaged)."""
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    arr = arr.astype(np.float64)
    if arr.ndim == 3:
        arr = arr.mean(axis=0)
    if arr.ndim != 2:
        raise ValueError(f"expected an (H, W) or (C, H, W) image, got shape {arr.shape}")
    return arr


def _at_analysis_size(arr: np.ndarray, size: int) -> np.ndarray:
    if arr.shape == (size, size):
        return arr
    t = torch.from_numpy(arr)[None, None]
    if arr.shape[0] * arr.shape[1] >= size * size:  # shrinking: average, do not alias fine detail into edges
        out = F.interpolate(t, size=(size, size), mode="area")
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def laplacian_variance(img: np.ndarray | torch.Tensor, analysis_size: int = 224) -> float:
    """Variance of the 4-neighbour Laplacian of ``img`` (``[0, 1]`` intensities, scaled to 0-255).

    The image is first brought to ``analysis_size`` squared; a 2-pixel border is ignored (edge effects).
    """
    a = _at_analysis_size(_as_2d(img), analysis_size) * 255.0
    lap = ndimage.laplace(a)
    return float(lap[2:-2, 2:-2].var())


def rms_contrast(img: np.ndarray | torch.Tensor, analysis_size: int = 224) -> float:
    """RMS contrast: standard deviation of the ``[0, 1]`` intensities at ``analysis_size`` squared."""
    return float(_at_analysis_size(_as_2d(img), analysis_size).std())


@dataclass
class QualityAssessment:
    """Quality numbers of one image and the reasons it fails (empty when it passes)."""

    laplacian_variance: float
    contrast: float
    reasons: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.reasons

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


class ImageQualityFilter(Transform):
    """Reject blurry images and images with too low or too high contrast.

    Args:
        blur_threshold: minimum variance of the Laplacian (0-255 scale at ``analysis_size``); ``None``
            disables the blur check.
        contrast_range: ``(low, high)`` bounds of the RMS contrast of ``[0, 1]`` intensities; ``None``
            disables the contrast check.
        analysis_size: side of the square the image is brought to before measuring.

    ``__call__(img)`` takes a ``(C, H, W)`` or ``(H, W)`` image in ``[0, 1]`` (what
    :func:`ctcovid.io.load_xray` returns) and returns it unchanged if it passes; otherwise raises
    :class:`~ctcovid.io.errors.ImageQualityError` naming the file (from MetaTensor metadata) and every reason.
    :meth:`assess` returns the numbers without raising.
    """

    def __init__(
        self,
        blur_threshold: float | None = DEFAULT_BLUR_THRESHOLD,
        contrast_range: Sequence[float] | None = DEFAULT_CONTRAST_RANGE,
        analysis_size: int = 224,
    ) -> None:
        if contrast_range is not None:
            if len(contrast_range) != 2 or not 0.0 <= contrast_range[0] < contrast_range[1]:
                raise ValueError(f"contrast_range must be (low, high) with 0 <= low < high, got {contrast_range}")
            contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        if analysis_size < 8:
            raise ValueError(f"analysis_size must be >= 8, got {analysis_size}")
        self.blur_threshold = None if blur_threshold is None else float(blur_threshold)
        self.contrast_range = contrast_range
        self.analysis_size = int(analysis_size)

    def assess(self, img: np.ndarray | torch.Tensor) -> QualityAssessment:
        arr = _as_2d(img)
        if arr.size and (arr.min() < -1e-6 or arr.max() > 1.0 + 1e-6):
            raise ValueError(
                f"quality filters expect intensities in [0, 1] (as ctcovid.io.load_xray returns), "
                f"got {arr.min():.3g}..{arr.max():.3g}"
            )
        a = _at_analysis_size(arr, self.analysis_size)
        lv = laplacian_variance(a, self.analysis_size)
        c = float(a.std())
        reasons = []
        if self.blur_threshold is not None and lv < self.blur_threshold:
            reasons.append(f"blurry: variance of Laplacian {lv:.2f} < {self.blur_threshold:g}")
        if self.contrast_range is not None:
            lo, hi = self.contrast_range
            if c < lo:
                reasons.append(f"low contrast: RMS contrast {c:.4f} < {lo:g}")
            elif c > hi:
                reasons.append(f"high contrast: RMS contrast {c:.4f} > {hi:g}")
        return QualityAssessment(laplacian_variance=lv, contrast=c, reasons=reasons)

    def __call__(self, img: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        result = self.assess(img)
        if not result.passed:
            meta = getattr(img, "meta", None) or {}
            raise ImageQualityError(meta.get("filename_or_obj"), "; ".join(result.reasons))
        return img


class ImageQualityFilterd(MapTransform):
    """Dictionary twin of :class:`ImageQualityFilter`.

    Args:
        keys: image keys to check.
        on_fail: ``"raise"`` (an :class:`~ctcovid.io.errors.ImageQualityError` for the first failing key) or
            ``"mark"`` (keep going; the record tells whether it passed).
        quality_key_postfix: the assessment dict of key ``k`` is stored under ``f"{k}_{postfix}"``
            (``laplacian_variance``, ``contrast``, ``reasons``, ``passed``).
        allow_missing_keys: skip absent keys.
        kwargs: :class:`ImageQualityFilter` arguments.
    """

    def __init__(
        self,
        keys: KeysCollection,
        on_fail: str = "raise",
        quality_key_postfix: str = "quality",
        allow_missing_keys: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if on_fail not in ("raise", "mark"):
            raise ValueError(f"on_fail must be 'raise' or 'mark', got {on_fail!r}")
        self.on_fail = on_fail
        self.postfix = quality_key_postfix
        self.filter = ImageQualityFilter(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.on_fail == "raise":
                self.filter(d[key])
            d[f"{key}_{self.postfix}"] = self.filter.assess(d[key]).as_dict()
        return d


@dataclass
class CurationReport:
    """Result of :func:`curate`: kept items, removed items (each with ``quality`` numbers and reasons)."""

    kept: list[dict]
    removed: list[dict]

    def summary(self) -> dict[str, Any]:
        """Counts: total, kept, removed, removed per reason kind (blurry / low contrast / high contrast /
        unreadable) and removed per label."""
        kinds: Counter = Counter()
        for it in self.removed:
            for r in it["quality"]["reasons"]:
                kinds[r.split(":", 1)[0]] += 1
        return {
            "total": len(self.kept) + len(self.removed),
            "kept": len(self.kept),
            "removed": len(self.removed),
            "removed_by_reason": dict(sorted(kinds.items())),
            "removed_by_label": dict(sorted(Counter(str(it.get("label", "")) for it in self.removed).items())),
        }


def curate(
    items: Iterable[Mapping],
    quality_filter: ImageQualityFilter | None = None,
    image_key: str = "image",
    loader: Callable[[str], Any] | None = None,
) -> CurationReport:
    """Assess every item's image and split the datalist into kept and removed.

    Args:
        items: datalist dicts whose ``image_key`` is a file path.
        quality_filter: the filter (default thresholds if ``None``).
        image_key: key of the image path.
        loader: path -> image array in ``[0, 1]``; default :func:`ctcovid.io.load_xray`.

    Every item gets a ``quality`` dict (numbers, reasons, passed). Unreadable images are removed with the
    reader's error as reason ("unreadable: ...") instead of stopping the curation.
    """
    if loader is None:
        from ctcovid.io import load_xray as loader
    qf = quality_filter or ImageQualityFilter()
    kept, removed = [], []
    for it in items:
        rec = dict(it)
        try:
            q = qf.assess(loader(rec[image_key])).as_dict()
        except CTInputError as e:
            q = {"laplacian_variance": None, "contrast": None, "reasons": [f"unreadable: {e}"], "passed": False}
        rec["quality"] = q
        (kept if q["passed"] else removed).append(rec)
    return CurationReport(kept=kept, removed=removed)


def write_curation_report(report: CurationReport, path: str | os.PathLike, image_key: str = "image") -> Path:
    """Write one CSV row per assessed image (kept and removed): image, label, the two numbers, kept, reasons."""
    from ctcovid.io.atomic import write_csv_atomic

    fields = ["image", "label", "laplacian_variance", "contrast", "kept", "reasons"]
    rows = []
    for it, kept in [(i, True) for i in report.kept] + [(i, False) for i in report.removed]:
        q = it["quality"]
        rows.append(
            {
                "image": it[image_key],
                "label": it.get("label", ""),
                "laplacian_variance": "" if q["laplacian_variance"] is None else f"{q['laplacian_variance']:.3f}",
                "contrast": "" if q["contrast"] is None else f"{q['contrast']:.4f}",
                "kept": kept,
                "reasons": " | ".join(q["reasons"]),
            }
        )
    rows.sort(key=lambda r: str(r["image"]))
    return write_csv_atomic(rows, fields, path)


def balance_by_augmentation(
    items: Sequence[Mapping],
    label_key: str = "label",
    target_per_class: int | None = None,
    seed: int = 0,
    copy_key: str = COPY_KEY,
) -> list[dict]:
    """Top every class up to ``target_per_class`` images with copies flagged for augmentation.

    Args:
        items: datalist dicts with a ``label_key``.
        target_per_class: images per class after balancing (default: the largest class's count). Classes
            above it are left as they are (nothing is dropped).
        seed: which originals are copied first (each class's originals are cycled in a shuffled order, so
            copies are spread evenly over them).
        copy_key: every returned item gets ``copy_key`` = 0 for an original and 1, 2, ... for its copies.

    Returns:
        the originals followed by the copies; :class:`AugmentCopiesd` then augments items whose
        ``copy_key`` is > 0.
    """
    by_cls: dict[Any, list[dict]] = defaultdict(list)
    for it in items:
        by_cls[it[label_key]].append({**it, copy_key: 0})
    if not by_cls:
        return []
    target = max(len(v) for v in by_cls.values()) if target_per_class is None else int(target_per_class)
    rng = random.Random(seed)
    out = [it for cls in by_cls for it in by_cls[cls]]
    for cls in sorted(by_cls, key=str):
        originals = list(by_cls[cls])
        rng.shuffle(originals)
        need = target - len(originals)
        for i in range(max(0, need)):
            src = originals[i % len(originals)]
            out.append({**src, copy_key: 1 + i // len(originals)})
    return out


class AugmentCopiesd(Randomizable, MapTransform):
    """Apply a random augmentation only to the copies made by :func:`balance_by_augmentation`.

    Args:
        keys: keys of the data the augmentation acts on (for the copy flag check only; ``transform`` decides
            which keys it changes).
        transform: a (random) dictionary transform, e.g. a ``Compose`` of ``RandAffined`` + ``RandFlipd``.
            For an exact copy not to stay an exact copy, its random transforms should use ``prob=1``.
        copy_key: the flag written by :func:`balance_by_augmentation`; originals (0 or absent) pass unchanged.
    """

    def __init__(self, keys: KeysCollection, transform: Callable, copy_key: str = COPY_KEY,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = transform
        self.copy_key = copy_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> AugmentCopiesd:
        super().set_random_state(seed, state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:  # randomness lives in the wrapped transform
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if int(d.get(self.copy_key, 0) or 0) > 0:
            d = dict(self.transform(d))
        return d
