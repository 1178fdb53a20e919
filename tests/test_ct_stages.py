"""The CT pipeline as a list of stages: a new stage plugs in with one line and sees what earlier stages
found, a stage without weights says why it was skipped, and the batch runner works for any pipeline that
describes its results (not only the CT one)."""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import nibabel as nib
import numpy as np
import pytest
import torch

from ctcovid.ct.stages import SliceSelectionStage, Stage
from ctcovid.io.errors import CTInputError


@pytest.fixture(scope="module")
def seg_pipeline(seg_only_bundles):
    from ctcovid.ct import CTCovidPipeline

    return CTCovidPipeline(bundle_dir=seg_only_bundles, device="cpu", skip_missing=True, gradcam=False)


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory, medseg_dir) -> Path:
    """Six real lung slices of MedSeg rp4 as a NIfTI (the pipeline's cheapest real input)."""
    src = nib.load(medseg_dir / "images" / "rp4.nii.gz")
    path = tmp_path_factory.mktemp("scan") / "rp4_six.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj[:, :, 16:22], dtype=np.float32), src.affine), path)
    return path


class KeptLungVoxels(Stage):
    """A stage a user might add: counts lung voxels in the kept slices (reads the context, adds to it)."""

    name = "kept_lung_voxels"
    timings = ("kept_lung_voxels",)
    seen: ClassVar[list[int]] = []

    def run(self, pipeline, ctx) -> None:
        with ctx.timed(self.name):
            self.seen.append(int(ctx.kept_mask.sum()))


def test_added_stage_runs_in_order_and_reads_earlier_results(seg_pipeline, small_scan):
    pipe = copy.copy(seg_pipeline)
    at = [type(s) for s in pipe.stages].index(SliceSelectionStage) + 1
    pipe.stages = [*pipe.stages[:at], KeptLungVoxels(), *pipe.stages[at:]]
    KeptLungVoxels.seen.clear()

    res = pipe(small_scan)

    assert res.status == "ok" and res.kept_slices
    # it saw the lung mask as segmented; the infection stage after it may add consolidated lung
    added = res.lung_mask_added_voxels or 0
    assert KeptLungVoxels.seen == [int(res.lung_mask[:, :, res.kept_slices].sum()) - added]
    assert KeptLungVoxels.seen[0] > 0
    assert res.stages["kept_lung_voxels"] == "ok" and res.timings_s["kept_lung_voxels"] >= 0
    # the stages after it still ran (or said why not), the ones before it are unchanged
    assert res.stages["segmentation"] == "ok" and res.stages["mask_cleanup"] == "ok"
    assert res.stages["detection"].startswith("skipped: ") and "ct_covid_classification" in res.stages["detection"]
    assert res.stages["severity"].startswith("skipped: ")
    assert res.stages["slice_filter"].endswith("lung-mask area decides")
    assert seg_pipeline.stages[at].name != "kept_lung_voxels"  # the original pipeline is untouched


def test_stage_lookup_and_shared_settings(seg_pipeline):
    seg = seg_pipeline.stage("segmentation")
    assert seg.size == (256, 256) and seg.cleanup  # read once from the bundle
    assert seg_pipeline.models["segmentation"] is seg_pipeline.segmenter
    assert seg_pipeline.stage("infection").name == "infection"
    with pytest.raises(KeyError, match="no stage 'lesion_count'"):
        seg_pipeline.stage("lesion_count")
    assert seg_pipeline.runner.batch_size == seg_pipeline.batch_size == 4  # CPU fp32 default


def test_take_slices_views_consecutive_runs():
    from ctcovid.ct.context import take_slices

    vol = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    run = take_slices(vol, [1, 2, 3])
    assert torch.equal(run, vol[..., 1:4]) and run.data_ptr() == vol[..., 1:4].data_ptr()  # no copy
    gathered = take_slices(vol, [0, 2, 5])
    assert torch.equal(gathered, vol[..., [0, 2, 5]])


# ------------------------------------------------------------------ batch runner over another pipeline
@dataclass
class WordCount:
    """Result of :class:`WordCounter`: what ``run_batch`` needs of a result type, and nothing else."""

    SUMMARY_FIELDS: ClassVar[tuple[str, ...]] = ("scan_id", "path", "status", "reason", "words")
    scan_id: str
    path: str
    words: int | None = None
    status: str = "ok"
    reason: str | None = None
    input_sha256: str | None = None
    resume_key: str | None = None
    models: dict = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def output_names(scan_id: str) -> list[str]:
        return [f"{scan_id}.words.txt"]

    @classmethod
    def failed(cls, scan_id: str, path: str, reason: str, **fields: Any) -> WordCount:
        return cls(scan_id, path, None, "failed", reason, **fields)

    @staticmethod
    def summary_row_from_record(record: dict, scan_id: str, path: str, status: str, reason: str) -> dict:
        return {"scan_id": scan_id, "path": path, "status": status, "reason": reason, "words": record["words"]}

    def to_dict(self) -> dict:
        return {"status": self.status, "words": self.words, "resume_key": self.resume_key}

    def summary_row(self) -> dict:
        return {k: getattr(self, k) for k in self.SUMMARY_FIELDS}

    def save(self, out_dir) -> None:
        if self.status == "ok":
            (Path(out_dir) / f"{self.scan_id}.words.txt").write_text(str(self.words))
        (Path(out_dir) / f"{self.scan_id}.json").write_text(json.dumps(self.to_dict()))


class WordCounter:
    result_type = WordCount

    def __init__(self) -> None:
        self.processed: list[str] = []

    def read(self, path):
        text = Path(path).read_text()
        if not text.strip():
            raise CTInputError(path, "empty text")
        return text

    def process(self, volume, path=None, scan_id=None, read_seconds=None, on_stage=None):
        self.processed.append(scan_id)
        return WordCount(scan_id, str(path), words=len(volume.split()))

    def model_versions(self) -> dict:
        return {"counter": {"bundle": "none", "version": "1", "weights_sha256": None}}

    def options(self) -> dict:
        return {}


def test_run_batch_drives_any_pipeline_with_a_result_type(tmp_path):
    from ctcovid.running import run_batch

    (tmp_path / "in").mkdir()
    for name, text in (("a.nii", "one two three"), ("b.nii", "   "), ("c.nii", "four five")):
        (tmp_path / "in" / name).write_text(text)
    counter = WordCounter()
    report = run_batch([tmp_path / "in"], tmp_path / "out", counter, workers=0, progress=False, log=lambda m: None)

    assert [(r["scan_id"], r["status"], r["words"]) for r in report.rows] == [
        ("a", "ok", 3),
        ("b", "failed", None),
        ("c", "ok", 2),
    ]
    assert "empty text" in report.rows[1]["reason"]
    with open(report.summary_path, newline="") as f:
        assert next(csv.reader(f)) == ["scan_id", "path", "status", "reused", "reason", "words"]
    assert (tmp_path / "out" / "a.words.txt").read_text() == "3"

    # resume: finished inputs are reused through the result type's own record reader; the failed one retried
    again = run_batch([tmp_path / "in"], tmp_path / "out", counter, workers=0, progress=False, log=lambda m: None)
    assert [(r["status"], r["reused"], r["words"]) for r in again.rows] == [
        ("ok", True, 3),
        ("failed", False, None),
        ("ok", True, 2),
    ]
    assert counter.processed == ["a", "c"]
