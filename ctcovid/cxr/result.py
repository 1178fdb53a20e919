"""The cascade's answer for one image (:class:`CXRResult`) and its ``summary.csv`` row."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ctcovid.running.batch import SUMMARY_NAME  # one name for every run's summary

__all__ = ["FINAL_LABELS", "SUMMARY_FIELDS", "SUMMARY_NAME", "CXRResult"]

#: Final labels of the cascade, in the class order of :func:`evaluate_cascade`.
FINAL_LABELS = ("normal", "bacterial", "viral-other", "COVID-19")
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
    stage1_lung_box: list[int] | None = None  # (r0, r1, c0, c1) stage 1 saw, when it sees lung-box crops
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
