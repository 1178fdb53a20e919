"""What the CT pipeline found for one scan (:class:`CTResult`) and how it is written: JSON record, lung
mask NIfTI, montage PNG and the scan's ``summary.csv`` row."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = ["CTResult"]


def _round4(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


@dataclass
class CTResult:
    """Everything the pipeline found for one scan.

    Scalars and lists go into :meth:`to_dict` (the ``<scan>.json`` record). The arrays (``lung_mask``,
    ``image``, ``heatmap``, ``affine``) are for writing the mask and montage (:meth:`save`) and for
    notebooks; they are not in the record.

    Attributes (shapes refer to the input scan ``(X, Y, Z)``, Z = slices):
        status: ``"ok"`` or ``"failed"`` (``reason`` then says why).
        kept_slices: indices (along Z) of the slices judged to contain lung, ascending.
        slice_selection: ``"slice_filter"`` (ResNeXt) or ``"lung_mask_area"`` (fallback without its weights).
        lung_volume_ml: lung mask voxel count x voxel volume / 1000 (``None`` when spacing is unknown,
            e.g. slice-image folders, where ``lung_voxels`` still counts the mask).
        infection_volume_ml / lung_involvement_percent / lungs: lesion volume, its share of the lung (both
            lungs and ``lungs["right"|"left"]``); ``ct_severity_grade`` CT-0..CT-4 from the involvement
            (``ct_severity_source``). ``None`` when the infection stage did not run.
        covid_probability / covid_probability_spread: mean and population standard deviation over the
            detection members of P(COVID-19); ``None`` when detection was skipped.
        severity_probabilities / severity_spread: per class, same convention; ``None`` when not graded.
        stages: per stage ``"ok"``, ``"skipped: <why>"`` or ``"not run: <why>"``.
        models: per stage ``{bundle, version, weights_sha256, status}``.
        run: how the scan was computed: device, precision, batch size, ctcovid / torch / MONAI versions.
        timings_s: seconds per stage.
    """

    scan_id: str
    path: str
    status: str = "ok"
    reason: str | None = None
    source_format: str | None = None
    series_uid: str | None = None
    input_sha256: str | None = None
    shape: list[int] | None = None
    spacing_mm: list[float] | None = None
    spacing_known: bool | None = None
    intensity_domain: str | None = None
    slices_read: int | None = None
    kept_slices: list[int] = field(default_factory=list)
    slice_selection: str | None = None
    lung_voxels: int | None = None
    lung_volume_ml: float | None = None
    covid_probability: float | None = None
    covid_probability_spread: float | None = None
    covid_member_probabilities: list[float] | None = None
    covid_threshold: float | None = None
    prediction: str | None = None
    severity_probabilities: dict[str, float] | None = None
    severity_spread: dict[str, float] | None = None
    severity: str | None = None
    gradcam_layer: str | None = None
    infection_voxels: int | None = None
    infection_volume_ml: float | None = None
    lung_involvement_percent: float | None = None
    lungs: dict[str, dict] | None = None
    lung_mask_added_voxels: int | None = None
    lesion_found: bool | None = None
    min_involvement_percent: float | None = None
    ct_severity_grade: str | None = None
    ct_severity_source: str | None = None
    stages: dict[str, str] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    resume_key: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    output_notes: dict[str, str] = field(default_factory=dict)
    input_notes: list[str] = field(default_factory=list)
    tilt_drift_voxels: list[float] | None = None
    input_orientation: str | None = None  # axis codes of a non-axial input (masks are written back in them)
    assign_dicom_uids: bool = field(default=False, repr=False)  # SEG for a series without UIDs: dicom_seg_output
    lung_mask: np.ndarray | None = field(default=None, repr=False)  # (X, Y, Z) uint8
    infection_mask: np.ndarray | None = field(default=None, repr=False)  # (X, Y, Z) uint8
    image: np.ndarray | None = field(default=None, repr=False)  # (X, Y, Z) float32 in [0, 1]
    heatmap: np.ndarray | None = field(default=None, repr=False)  # (X, Y) float32 in [0, 1]
    affine: np.ndarray | None = field(default=None, repr=False)  # (4, 4) index -> RAS mm

    @property
    def voxel_ml(self) -> float | None:
        """Volume of one voxel in ml (``None`` when the spacing is unknown, e.g. slice-image folders)."""
        return float(np.prod(self.spacing_mm)) / 1000.0 if self.spacing_known else None

    @property
    def slices_kept(self) -> int:
        return len(self.kept_slices)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (what ``<scan>.json`` holds)."""
        from ctcovid import __version__

        detection = None
        if self.covid_probability is not None:
            detection = {
                "covid_probability": self.covid_probability,
                "covid_probability_spread": self.covid_probability_spread,
                "member_probabilities": self.covid_member_probabilities,
                "threshold": self.covid_threshold,
                "prediction": self.prediction,
                "gradcam_layer": self.gradcam_layer,
            }
        severity = None
        if self.severity_probabilities is not None:
            severity = {
                "grade": self.severity,
                "probabilities": self.severity_probabilities,
                "spread": self.severity_spread,
            }
        infection = None
        if self.infection_voxels is not None:
            voxel_ml = self.voxel_ml
            infection = {
                "infection_voxels": self.infection_voxels,
                "infection_volume_ml": self.infection_volume_ml,
                "lung_involvement_percent": self.lung_involvement_percent,
                "lungs": self.lungs,
                "lesion_found": self.lesion_found,
                "min_involvement_percent": self.min_involvement_percent,
                "ct_severity_grade": self.ct_severity_grade,
                "ct_severity_source": self.ct_severity_source,
                "lung_mask_added_ml": None if voxel_ml is None else self.lung_mask_added_voxels * voxel_ml,
                "lung_mask_added_voxels": self.lung_mask_added_voxels,
            }
        return {
            "scan": {
                "id": self.scan_id,
                "path": self.path,
                "format": self.source_format,
                "series_uid": self.series_uid or None,
                "input_sha256": self.input_sha256,
                "shape": self.shape,
                "spacing_mm": self.spacing_mm,
                "spacing_known": self.spacing_known,
                "intensity_domain": self.intensity_domain,
                "input_notes": list(self.input_notes),
                "gantry_tilt_drift_voxels": self.tilt_drift_voxels,
                "input_orientation": self.input_orientation,
            },
            "status": self.status,
            "reason": self.reason,
            "slices": {
                "read": self.slices_read,
                "kept": self.slices_kept,
                "kept_indices": list(self.kept_slices),
                "selection": self.slice_selection,
            },
            "lung_voxels": self.lung_voxels,
            "lung_volume_ml": self.lung_volume_ml,
            "infection": infection,
            "detection": detection,
            "severity": severity,
            "stages": dict(self.stages),
            "models": dict(self.models),
            "timings_s": {k: round(v, 4) for k, v in self.timings_s.items()},
            "outputs": dict(self.outputs),
            "output_notes": dict(self.output_notes),
            "resume_key": self.resume_key,
            "run": dict(self.run),
            "ctcovid_version": __version__,
        }

    def save(self, out_dir: str | os.PathLike, montage: bool = True) -> dict[str, Path]:
        """Write ``<id>_lung_mask.nii.gz``, ``<id>_infection_mask.nii.gz`` (when lesions were segmented), for
        DICOM inputs ``<id>_seg.dcm`` (DICOM SEG), ``<id>_montage.png`` and then ``<id>.json`` into ``out_dir``.

        Each file is written atomically; the JSON goes last, so its presence means the others are complete
        (the resume check relies on that). When a write fails (a full disk), the files this call already
        wrote are removed before the error propagates. A failed result writes only its JSON record.
        """
        from ctcovid.io.atomic import write_json_atomic

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        try:
            self._write_outputs(out, montage, written)
            self.outputs = {k: p.name for k, p in written.items()}
            self.outputs["record"] = f"{self.scan_id}.json"
            written["record"] = write_json_atomic(self.to_dict(), out / f"{self.scan_id}.json")
        except BaseException:  # e.g. a full disk: no file of a half-saved scan stays behind
            for p in written.values():
                if p.is_dir():  # the series copy with assigned UIDs
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            raise
        return written

    def _write_outputs(self, out: Path, montage: bool, written: dict[str, Path]) -> None:
        """Masks, DICOM SEG and montage into ``out``; each file goes into ``written`` as soon as it exists."""
        from ctcovid.io.atomic import write_nifti_atomic

        from .montage import pick_montage_slices, save_montage_png

        for key, mask in (("lung_mask", self.lung_mask), ("infection_mask", self.infection_mask)):
            if self.status == "ok" and mask is not None and self.affine is not None:
                array, affine = self.in_input_order(mask.astype(np.uint8))
                written[key] = write_nifti_atomic(array, affine, out / f"{self.scan_id}_{key}.nii.gz")
        if self.status == "ok" and self.source_format == "dicom" and self.lung_mask is not None:
            from .dicom_seg_output import save_dicom_seg

            save_dicom_seg(self, out, written)
        if self.status == "ok" and montage and self.image is not None and self.lung_mask is not None:
            t = time.perf_counter()
            title, note = self._montage_heading()
            written["montage"] = save_montage_png(
                out / f"{self.scan_id}_montage.png",
                self.image,
                self.lung_mask,
                pick_montage_slices(self.kept_slices, lesion_area=self._lesion_area()),
                affine=self.affine,
                heatmap=self.heatmap,
                infection=self.infection_mask,
                title=title,
                note=note,
            )
            self.timings_s["montage"] = time.perf_counter() - t  # the costliest output (~1 s of matplotlib)

    def _lesion_area(self) -> list[int] | None:
        if self.infection_mask is None:
            return None
        return [int(np.count_nonzero(self.infection_mask[:, :, k])) for k in self.kept_slices]

    def in_input_order(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(mask, affine)`` in the input file's voxel order (undoes a reorientation to axial)."""
        from ctcovid.io.orientation import to_input_order

        return to_input_order(mask, self.affine, self.input_orientation or "")

    def _montage_heading(self) -> tuple[str, str]:
        parts = [self.scan_id, f"{self.slices_kept}/{self.slices_read} slices kept ({self.slice_selection})"]
        if self.lung_volume_ml is not None:
            parts.append(f"lung {self.lung_volume_ml:.0f} ml")
        if self.covid_probability is not None:
            parts.append(
                f"P(COVID-19) {self.covid_probability:.3f} ± {self.covid_probability_spread:.3f} -> {self.prediction}"
            )
        if self.lung_involvement_percent is not None:
            parts.append(f"involvement {self.lung_involvement_percent:.1f}% ({self.ct_severity_grade})")
        if self.severity is not None:
            parts.append(f"severity {self.severity}")
        notes = ["green: lung contour"]
        if self.infection_mask is not None:
            notes.append("red: lesions (infection mask)")
        else:
            notes.append(f"no lesion mask ({self.stages.get('infection', 'not run')})")
        if self.heatmap is not None:
            notes.append("colour: Grad-CAM of the detection ensemble (mean over members, one map per scan)")
        elif self.stages.get("detection", "").startswith("skipped"):
            bundle = self.models.get("detection", {}).get("bundle", "detection bundle")
            notes.append(
                f"detection skipped ({bundle} has no trained weights): lung contour only, no Grad-CAM"
            )
        else:
            notes.append(f"no Grad-CAM ({self.stages.get('gradcam', 'not run')})")
        notes.append(self._provenance_line())
        return " | ".join(parts), "; ".join(notes)

    def _provenance_line(self) -> str:
        """``ctcovid 0.2.0, fp32 on cpu; models: ct_lung_segmentation 0.2.2 (d97b891e), ...`` (loaded ones)."""
        run = self.run or {}
        head = f"ctcovid {run.get('ctcovid', '?')}, {run.get('precision', '?')} on {run.get('device', '?')}"
        models = [
            f"{m.get('bundle')} {m.get('version')} ({str(m.get('weights_sha256') or '')[:8]})"
            for m in self.models.values()
            if str(m.get("status", "")).startswith("loaded")
        ]
        return f"{head}; models: {', '.join(models) or 'none'}"

    #: Fixed columns of ``summary.csv``; ``p_<class>`` severity columns follow, in class order. Each value
    #: that can be empty has a column saying why beside it (``reason`` for a failed scan; the ``*_status``
    #: columns: ``ok``, ``skipped: <why>`` or ``not run: <why>``).
    SUMMARY_FIELDS: ClassVar[tuple[str, ...]] = (
        "scan_id",
        "path",
        "status",
        "reason",
        "slices_read",
        "slices_kept",
        "lung_volume_ml",
        "lung_volume_status",
        "lung_involvement_percent",
        "ct_severity_grade",
        "infection_status",
        "covid_probability",
        "covid_probability_spread",
        "prediction",
        "detection_status",
        "severity",
        "severity_status",
        "input_notes",
    )

    @staticmethod
    def output_names(scan_id: str) -> list[str]:
        """Files besides the JSON record that a finished scan has (resume checks they still exist)."""
        return [f"{scan_id}_lung_mask.nii.gz", f"{scan_id}_montage.png"]

    @classmethod
    def failed(cls, scan_id: str, path: str, reason: str, **fields: Any) -> CTResult:
        """The record of a scan that could not be processed (``reason`` says why)."""
        return cls(scan_id=scan_id, path=path, status="failed", reason=reason, **fields)

    def summary_row(self) -> dict[str, Any]:
        """One ``summary.csv`` row (key numbers; probabilities rounded to 4 decimals): the same row a
        resumed run rebuilds from this result's record."""
        return self.summary_row_from_record(self.to_dict(), self.scan_id, self.path, self.status, self.reason)

    @staticmethod
    def summary_row_from_record(record: dict, scan_id: str, path: str, status: str, reason: str) -> dict[str, Any]:
        """The ``summary.csv`` row of a scan from its ``<id>.json`` record (also on resume)."""
        det = record.get("detection") or {}
        inf = record.get("infection") or {}
        sev = record.get("severity") or {}
        slices = record.get("slices") or {}
        stages = record.get("stages") or {}
        ok = status == "ok"
        not_run = "not run: the scan failed (see reason)"

        def stage_status(name: str) -> str:
            return stages.get(name, "not run") if ok else not_run

        volume = record.get("lung_volume_ml")
        if not ok:
            volume_status = not_run
        elif volume is None:
            volume_status = "not computed: voxel spacing unknown (slice images); lung_voxels in the JSON record"
        else:
            volume_status = "ok"
        row = {
            "scan_id": scan_id,
            "path": path,
            "status": status,
            "reason": reason,
            "slices_read": slices.get("read"),
            "slices_kept": slices.get("kept") if ok else None,
            "lung_volume_ml": _round4(volume),
            "lung_volume_status": volume_status,
            "lung_involvement_percent": None if inf.get("lung_involvement_percent") is None
            else round(float(inf["lung_involvement_percent"]), 2),
            "ct_severity_grade": inf.get("ct_severity_grade"),
            "infection_status": stage_status("infection"),
            "covid_probability": _round4(det.get("covid_probability")),
            "covid_probability_spread": _round4(det.get("covid_probability_spread")),
            "prediction": det.get("prediction"),
            "detection_status": stage_status("detection"),
            "severity": sev.get("grade"),
            "severity_status": stage_status("severity"),
            "input_notes": " | ".join((record.get("scan") or {}).get("input_notes") or []),
        }
        for name, p in (sev.get("probabilities") or {}).items():
            row[f"p_{name}"] = _round4(p)
        return row
