"""End-to-end CT pipeline (issue 4) on real scans: outputs' content, failures, resume.

Scans are real (COVID-CT-MD DICOM normal002, a MedSeg NIfTI, a JPG-slice folder written here from real
MedSeg slices, the TotalSegmentator and lungmask CT fixtures); the models are those of
:mod:`ct_fixtures` (the shipped lung segmenter, tiny ensembles with known outputs).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import data_path
from ct_fixtures import (
    DET_BIASES,
    DET_BUNDLE,
    FILTER_BUNDLE,
    INFECTION_BUNDLE,
    SEG_BUNDLE,
    SEV_BUNDLE,
    build_and_save,
    copy_configs,
    set_head,
    sigmoid,
)


@pytest.fixture(scope="session")
def jpg_scan(tmp_path_factory, medseg_dir) -> Path:
    """A COV19-CT-DB-style folder of 8 JPG slices written from real MedSeg rp4 lung slices (0.jpg ... 7.jpg)."""
    from PIL import Image

    vol = np.asarray(nib.load(medseg_dir / "images" / "rp4.nii.gz").dataobj[:, :, 16:24], dtype=np.float32)
    scaled = np.clip(vol / 4095.0 * 255.0, 0, 255).astype(np.uint8)
    folder = tmp_path_factory.mktemp("jpg") / "ct_scan_rp4"
    folder.mkdir()
    for k in range(scaled.shape[2]):
        # the displayed axial image of this NIfTI is data[:, :, k].T (see the data's PROVENANCE.txt)
        Image.fromarray(scaled[:, :, k].T).save(folder / f"{k}.jpg", quality=95)
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------- outputs
@pytest.fixture(scope="module")
def real_run(pipeline, covid_ct_md_series, medseg_dir, jpg_scan, tmp_path_factory):
    from ctcovid.running import run_batch

    out = tmp_path_factory.mktemp("real_run")
    inputs = [covid_ct_md_series, medseg_dir / "images" / "rp2.nii.gz", jpg_scan]
    report = run_batch(inputs, out, pipeline, workers=1, progress=False)
    return report, out, inputs


def test_batch_outputs_on_real_scans(real_run, test_bundles):
    report, out, inputs = real_run
    assert [r["status"] for r in report.rows] == ["ok", "ok", "ok"], report.rows
    ids = ["normal002", "rp2", "ct_scan_rp4"]
    assert [r["scan_id"] for r in report.rows] == ids

    det_p = [sigmoid(b) for b in DET_BIASES]
    for scan_id, path in zip(ids, inputs):
        rec = json.loads((out / f"{scan_id}.json").read_text())
        assert rec["status"] == "ok" and rec["reason"] is None
        assert rec["scan"]["id"] == scan_id and rec["scan"]["path"] == str(path)
        assert rec["scan"]["input_sha256"] and len(rec["resume_key"]) == 64
        # slices read and kept
        n = rec["slices"]["read"]
        kept = rec["slices"]["kept_indices"]
        assert isinstance(n, int) and rec["scan"]["shape"][2] == n
        assert (
            rec["slices"]["kept"] == len(kept) >= 1
            and kept == sorted(set(kept))
            and 0 <= kept[0] <= kept[-1] < n
        )
        assert rec["slices"]["selection"] == "lung_mask_area"  # no slice-filter weights in test_bundles
        # detection: mean and population spread of the members' P(COVID) (class index 1 = "covid")
        det = rec["detection"]
        assert det["member_probabilities"] == pytest.approx(det_p, abs=0.01)
        assert det["covid_probability"] == pytest.approx(np.mean(det_p), abs=0.01)
        assert det["covid_probability_spread"] == pytest.approx(np.std(det_p), abs=0.01)
        assert det["prediction"] == "COVID-19" and det["gradcam_layer"] == "backbone.features.norm5"
        # severity: class names from the bundle, probabilities sum to 1, "moderate" set by the head bias
        sev = rec["severity"]
        assert list(sev["probabilities"]) == ["mild", "moderate", "severe", "critical"]
        assert sum(sev["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert sev["grade"] == "moderate"
        # provenance: bundle versions and the weight files' hashes
        for stage, bundle in (
            ("segmentation", SEG_BUNDLE),
            ("detection", DET_BUNDLE),
            ("severity", SEV_BUNDLE),
        ):
            m = rec["models"][stage]
            meta = json.loads((test_bundles / bundle / "configs" / "metadata.json").read_text())
            assert m["bundle"] == bundle and m["version"] == meta["version"]
            assert m["weights_sha256"] == _sha256(test_bundles / bundle / "models" / "model.pt")
        assert rec["models"]["slice_filter"]["weights_sha256"] is None
        assert rec["stages"]["slice_filter"].startswith("skipped")
        assert all(
            rec["stages"][s] == "ok" for s in ("read", "segmentation", "detection", "gradcam", "severity")
        )
        assert set(rec["timings_s"]) >= {
            "read",
            "segmentation",
            "detection",
            "gradcam",
            "severity",
            "outputs",
        }
        assert all(isinstance(v, float) and v >= 0 for v in rec["timings_s"].values())
        # montage: a valid PNG
        from PIL import Image

        with Image.open(out / rec["outputs"]["montage"]) as im:
            im.verify()
        with Image.open(out / rec["outputs"]["montage"]) as im:
            assert im.format == "PNG" and min(im.size) > 200


def test_mask_geometry_and_lung_volume(real_run, covid_ct_md_series, medseg_dir):
    import pydicom

    from ctcovid.io import load_ct

    report, out, inputs = real_run
    # NIfTI: the mask has the input file's own grid (checked against nibabel, not our reader)
    src = nib.load(inputs[1])
    mask = nib.load(out / "rp2_lung_mask.nii.gz")
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine, atol=1e-4)
    m = np.asarray(mask.dataobj)
    assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    rec = json.loads((out / "rp2.json").read_text())
    voxel_ml = abs(np.linalg.det(src.affine[:3, :3])) / 1000.0
    assert rec["lung_voxels"] == int(m.sum()) > 0
    assert rec["lung_volume_ml"] == pytest.approx(m.sum() * voxel_ml, rel=1e-4)
    assert rec["scan"]["format"] == "nifti" and rec["scan"]["series_uid"] is None
    # the mask lies on the scan, not mirrored or transposed: it covers the reference lung mask of this
    # scan far better than any flipped / transposed version of itself does
    ref = np.asarray(nib.load(medseg_dir / "lung_masks" / "rp2.nii.gz").dataobj) > 0

    def recall(pred):
        return np.logical_and(ref, pred > 0).sum() / ref.sum()

    flips = [m[::-1], m[:, ::-1], m[:, :, ::-1], m.transpose(1, 0, 2)]
    assert recall(m) > 0.85 and recall(m) > max(recall(f) for f in flips) + 0.05, [recall(m)] + [
        recall(f) for f in flips
    ]

    # DICOM: same grid as the series read by ctcovid.io; series UID from the files themselves
    volume = load_ct(inputs[0])
    mask = nib.load(out / "normal002_lung_mask.nii.gz")
    assert mask.shape == tuple(volume.shape[1:]) == (512, 512, 167)
    assert np.allclose(mask.affine, np.asarray(volume.meta["original_affine"]), atol=1e-4)
    rec = json.loads((out / "normal002.json").read_text())
    uid = pydicom.dcmread(next(covid_ct_md_series.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
    assert rec["scan"]["series_uid"] == uid and rec["scan"]["format"] == "dicom"
    assert rec["slices"]["read"] == 167
    # a real adult chest CT: both lungs are litres, not millilitres or tens of litres
    assert 1500 < rec["lung_volume_ml"] < 10000, rec["lung_volume_ml"]

    # slice folder: no physical spacing, so no volume in ml (the voxel count is still there)
    rec = json.loads((out / "ct_scan_rp4.json").read_text())
    assert rec["scan"]["format"] == "slices" and rec["scan"]["spacing_known"] is False
    assert rec["lung_volume_ml"] is None and rec["lung_voxels"] > 0
    assert nib.load(out / "ct_scan_rp4_lung_mask.nii.gz").shape == (630, 630, 8)


def test_summary_csv(real_run):
    report, out, _ = real_run
    rows = _read_csv(out / "summary.csv")
    assert [r["scan_id"] for r in rows] == ["normal002", "rp2", "ct_scan_rp4"]
    for row in rows:
        rec = json.loads((out / f"{row['scan_id']}.json").read_text())
        assert row["status"] == "ok" and row["reason"] == ""
        assert (
            int(row["slices_read"]) == rec["slices"]["read"]
            and int(row["slices_kept"]) == rec["slices"]["kept"]
        )
        assert float(row["covid_probability"]) == pytest.approx(
            rec["detection"]["covid_probability"], abs=1e-4
        )
        assert row["severity"] == "moderate"
        assert float(row["p_moderate"]) == pytest.approx(
            rec["severity"]["probabilities"]["moderate"], abs=1e-4
        )


# ------------------------------------------------------------------------------------------- Python API
def test_python_api_result(pipeline, shared_data):
    scan = data_path("fixtures", "lungmask_testdata")
    result = pipeline(scan)
    assert result.status == "ok" and result.scan_id == "lungmask_testdata"
    assert result.lung_mask.shape == (512, 512, 2) and result.lung_mask.dtype == np.uint8
    assert result.heatmap.shape == (512, 512) and 0.0 <= result.heatmap.min() <= result.heatmap.max() <= 1.0
    d = result.to_dict()
    json.dumps(d, allow_nan=False)  # JSON-ready as is
    assert d["slices"]["read"] == 2 and d["scan"]["format"] == "dicom"
    assert "lung_mask" not in d and "image" not in d


def test_severity_gate_and_missing_detection(test_bundles, tmp_path, shared_data):
    """Severity runs only on scans predicted COVID-19; without detection weights detection is skipped."""
    from ctcovid.bundle import MissingWeightsError
    from ctcovid.ct import CTCovidPipeline

    variant = tmp_path / "bundles"
    variant.mkdir()
    for name in (SEG_BUNDLE, FILTER_BUNDLE, SEV_BUNDLE, INFECTION_BUNDLE):
        os.symlink(test_bundles / name, variant / name)
    copy_configs(DET_BUNDLE, variant)  # configs, no weights
    with pytest.raises(MissingWeightsError, match=f"bundle {DET_BUNDLE}.*train"):
        CTCovidPipeline(bundle_dir=variant, device="cpu", skip_missing=False)
    pipe = CTCovidPipeline(bundle_dir=variant, device="cpu")  # skips what has no weights; severity="covid"
    result = pipe(data_path("fixtures", "lungmask_testdata"))
    assert result.status == "ok" and result.covid_probability is None and result.heatmap is None
    assert result.stages["detection"].startswith("skipped: no trained weights")
    assert result.stages["severity"].startswith("not run: no detection result")
    assert result.severity_probabilities is None
    paths = result.save(tmp_path / "out")
    assert {"lung_mask", "montage", "record"} <= set(paths)
    rec = json.loads(paths["record"].read_text())
    assert rec["detection"] is None and rec["models"]["detection"]["status"].startswith("skipped")


def test_slice_filter_decides_when_it_has_weights(test_bundles, tmp_path, totalseg_dir):
    """With slice-filter weights the network, not the mask area, picks the slices; none kept -> NoLungSlicesError."""
    from ctcovid.ct import CTCovidPipeline
    from ctcovid.io.errors import NoLungSlicesError
    from ctcovid.transforms import LungSlicesFromMask

    variant = tmp_path / "bundles"
    variant.mkdir()
    os.symlink(test_bundles / SEG_BUNDLE, variant / SEG_BUNDLE)
    for name in (DET_BUNDLE, SEV_BUNDLE):
        copy_configs(name, variant)
    flt = copy_configs(FILTER_BUNDLE, variant, {"spatial_size": [64, 64]})
    build_and_save(flt, lambda net: set_head(net.backbone, [0.0, 5.0]))  # every slice: lung

    pipe = CTCovidPipeline(bundle_dir=variant, device="cpu", skip_missing=True)
    scan = totalseg_dir / "example_ct_sm.nii.gz"  # 30 slices, lung in the upper 11 only
    result = pipe(scan)
    assert result.slice_selection == "slice_filter" and result.stages["slice_filter"] == "ok"
    assert result.kept_slices == list(range(30))
    by_area = LungSlicesFromMask(min_area=pipe.min_lung_area)(torch.from_numpy(result.lung_mask)[None])
    assert int(by_area.sum()) >= 1  # the mask-area rule finds lung slices ...

    set_head(pipe.slice_filter.network.backbone, [5.0, 0.0])  # every slice: not lung
    with pytest.raises(NoLungSlicesError, match="example_ct_sm"):  # ... but the filter decides: none
        pipe(scan)


# -------------------------------------------------------------------------------- failures and resume
def test_batch_with_corrupt_scan_finishes_the_others(fast_pipeline, tmp_path, shared_data):
    from ctcovid.running import run_batch

    good = data_path("fixtures", "lungmask_testdata")
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes((data_path("ct", "medseg", "images", "rp2.nii.gz")).read_bytes()[:4000])  # truncated
    out = tmp_path / "out"
    report = run_batch([corrupt, good], out, fast_pipeline, progress=False)
    assert [r["status"] for r in report.rows] == ["failed", "ok"]
    assert report.failed == 1 and report.ok == 1
    rows = _read_csv(out / "summary.csv")
    assert (
        rows[0]["scan_id"] == "broken"
        and rows[0]["status"] == "failed"
        and "broken.nii.gz" in rows[0]["reason"]
    )
    assert rows[1]["status"] == "ok"
    rec = json.loads((out / "broken.json").read_text())
    assert rec["status"] == "failed" and "broken.nii.gz" in rec["reason"]
    assert not (out / "broken_lung_mask.nii.gz").exists()


def test_resume_skips_done_scans_by_content_hash(fast_pipeline, tmp_path, totalseg_dir, shared_data):
    from ctcovid.running import run_batch

    pipeline = fast_pipeline

    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(totalseg_dir / "example_ct_sm.nii.gz", scans / "a.nii.gz")
    shutil.copytree(data_path("fixtures", "lungmask_testdata"), scans / "b")
    shutil.copy(totalseg_dir / "example_ct_sm.nii.gz", scans / "c.nii.gz")
    out = tmp_path / "out"

    # a "killed" run: only the first scan got done
    first = run_batch([scans / "a.nii.gz"], out, pipeline, progress=False)
    assert [r["status"] for r in first.rows] == ["ok"]
    stamp = (out / "a.json").stat().st_mtime_ns

    # the full run: a is reused, the others are computed; summary lists all three as they finished
    full = run_batch([scans], out, pipeline, progress=False)
    assert [(r["scan_id"], r["status"], r["reused"]) for r in full.rows] == [
        ("a", "ok", True),
        ("b", "ok", False),
        ("c", "ok", False),
    ]
    assert full.ok == 3 and full.reused == 1
    assert (out / "a.json").stat().st_mtime_ns == stamp  # not rewritten
    rows = _read_csv(out / "summary.csv")
    assert [(r["status"], r["reused"]) for r in rows] == [("ok", "True"), ("ok", "False"), ("ok", "False")]
    assert list(rows[0])[:5] == ["scan_id", "path", "status", "reused", "reason"]
    # the reused row carries the values it finished with, not a placeholder
    first_row = {k: str(v) for k, v in first.rows[0].items() if k != "reused"}
    assert {k: rows[0][k] for k in first_row} == {k: ("" if v == "None" else v) for k, v in first_row.items()}
    a_rec = json.loads((out / "a.json").read_text())
    assert float(rows[0]["covid_probability"]) == pytest.approx(
        a_rec["detection"]["covid_probability"], abs=1e-4
    )

    # a changed input is recomputed, the unchanged ones are not
    img = nib.load(scans / "c.nii.gz")
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] += 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), scans / "c.nii.gz")
    again = run_batch([scans], out, pipeline, progress=False)
    assert [r["reused"] for r in again.rows] == [True, True, False]

    # a done scan whose output was deleted is not done any more
    (out / "b_montage.png").unlink()
    # --force recomputes everything
    forced = run_batch([scans / "a.nii.gz"], out, pipeline, force=True, progress=False)
    assert [r["status"] for r in forced.rows] == ["ok"]
    assert (out / "a.json").stat().st_mtime_ns != stamp
    last = run_batch([scans], out, pipeline, progress=False)
    assert [r["reused"] for r in last.rows] == [True, False, True]


def test_discover_scans_layouts(tmp_path, shared_data):
    """DICOM series folders (with or without .dcm names), slice folders, NIfTI files and parents of them."""
    from ctcovid.io.errors import InputNotFoundError
    from ctcovid.running.scans import classify_folder, discover_scans

    totalseg = data_path("fixtures", "totalsegmentator_example_ct")
    assert classify_folder(totalseg / "example_ct_dicom") == "dicom"  # files without extension: DICM preamble
    assert classify_folder(totalseg) == "parent"
    root = tmp_path / "cohort"
    (root / "covid" / "ct_scan_0").mkdir(parents=True)
    (root / "non-covid" / "ct_scan_0").mkdir(parents=True)
    for d in ("covid", "non-covid"):
        (root / d / "ct_scan_0" / "0.jpg").write_bytes(b"x")
    (root / "notes").mkdir()
    os.symlink(totalseg / "example_ct_sm.nii.gz", root / "scan.nii.gz")
    (root / "preview.png").write_bytes(b"x")  # next to a NIfTI: not a slice folder
    scans = discover_scans([root, totalseg / "example_ct_dicom"])
    assert [s.scan_id for s in scans] == [
        "covid__ct_scan_0",
        "non-covid__ct_scan_0",
        "scan",
        "example_ct_dicom",
    ]
    assert scans[0].path == (root / "covid" / "ct_scan_0").absolute()
    with pytest.raises(InputNotFoundError, match="nope"):
        discover_scans([tmp_path / "nope"])
