"""End-to-end CT pipeline (issue 4) on real scans: outputs' content, failures, resume.

What is real and what is not:
- scans are real (COVID-CT-MD DICOM normal002, a MedSeg NIfTI, a JPG-slice folder written here from real
  MedSeg slices, the TotalSegmentator and lungmask CT fixtures);
- the lung segmenter is the shipped, trained one (``bundles/ct_lung_segmentation/models/model.pt``);
- the detection and severity ensembles have no trained weights, so tiny versions (fewer members, shallow
  stacks, small slices; same architecture) are saved here with random features and a head whose bias sets
  each member's output. That makes the expected probabilities known: these tests check the plumbing (class
  index, averaging, spread, severity gating, output files), not accuracy.
"""

from __future__ import annotations

import copy
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

from ctcovid.bundle import bundles_root

SEG_BUNDLE = "ct_lung_segmentation"
DET_BUNDLE = "ct_covid_classification"
SEV_BUNDLE = "ct_covid_severity_classification"
FILTER_BUNDLE = "ct_lung_slice_filter"

#: Biases of the detection members' heads: member i outputs softmax([0, b_i]) up to tiny random weights.
DET_BIASES = (1.0, 2.0)
#: Severity head bias: "moderate" wins.
SEV_BIAS = (0.0, 3.0, 0.0, 0.0)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def _copy_configs(name: str, dst_root: Path, overrides: dict | None = None) -> Path:
    src = bundles_root() / name
    dst = dst_root / name
    shutil.copytree(src / "configs", dst / "configs")
    (dst / "models").mkdir(parents=True)
    if overrides:
        cfg_file = dst / "configs" / "inference.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.update(overrides)
        cfg_file.write_text(json.dumps(cfg, indent=2))
    return dst


def _set_head(classifier: torch.nn.Module, bias, scale: float = 0.0) -> None:
    """Scale the head's weights (0: the features do not matter) and set its bias: the output is then known.

    Grad-CAM needs a gradient through the head, so the detection members keep tiny weights (1e-4: their
    DenseNet features are small enough that the bias still decides to within 0.01).
    """
    head = classifier.get_classifier()
    with torch.no_grad():
        head.weight.mul_(scale)
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))


def _build_and_save(bundle_dir: Path, set_heads) -> None:
    from ctcovid.bundle.loading import read_bundle_config

    torch.manual_seed(0)
    net = read_bundle_config(bundle_dir).get_parsed_content("network_def")
    set_heads(net)
    torch.save(net.state_dict(), bundle_dir / "models" / "model.pt")


@pytest.fixture(scope="session")
def test_bundles(tmp_path_factory) -> Path:
    """Bundle folder: shipped segmenter + tiny detection/severity ensembles with set heads; no slice filter."""
    seg_weights = bundles_root() / SEG_BUNDLE / "models" / "model.pt"
    if not seg_weights.is_file():
        pytest.skip(f"the lung segmenter has no shipped weights yet ({seg_weights})")
    root = tmp_path_factory.mktemp("bundles")
    shutil.copytree(bundles_root() / SEG_BUNDLE, root / SEG_BUNDLE)
    _copy_configs(FILTER_BUNDLE, root)  # configs only: the mask-area rule decides
    det = _copy_configs(DET_BUNDLE, root, {"num_members": 2, "depth": 8, "spatial_size": [64, 64]})

    def det_heads(net):
        for member, b in zip(net.members, DET_BIASES):
            _set_head(member.backbone, [0.0, b], scale=1e-4)

    _build_and_save(det, det_heads)
    sev = _copy_configs(
        SEV_BUNDLE,
        root,
        {"backbones": ["inception_v3"], "repeats": 1, "depths": [4, 4], "spatial_size": [80, 80]},
    )

    def sev_heads(net):
        for member in net.members:
            _set_head(member.backbone, SEV_BIAS)

    _build_and_save(sev, sev_heads)
    return root


@pytest.fixture(scope="session")
def pipeline(test_bundles):
    from ctcovid.ct import CTCovidPipeline

    return CTCovidPipeline(bundle_dir=test_bundles, device="cpu", batch_size=8, severity="always")


@pytest.fixture(scope="session")
def fast_pipeline(pipeline):
    """The same loaded networks without Grad-CAM and severity: for tests about batches, not about outputs."""
    fast = copy.copy(pipeline)
    fast.use_gradcam = False
    fast.severity_mode = "never"
    return fast


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

    det_p = [_sigmoid(b) for b in DET_BIASES]
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
    for name in (SEG_BUNDLE, FILTER_BUNDLE, SEV_BUNDLE):
        os.symlink(test_bundles / name, variant / name)
    _copy_configs(DET_BUNDLE, variant)  # configs, no weights
    with pytest.raises(MissingWeightsError, match=f"bundle {DET_BUNDLE}.*train"):
        CTCovidPipeline(bundle_dir=variant, device="cpu")
    pipe = CTCovidPipeline(bundle_dir=variant, device="cpu", skip_missing=True)  # severity="covid"
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
        _copy_configs(name, variant)
    flt = _copy_configs(FILTER_BUNDLE, variant, {"spatial_size": [64, 64]})
    _build_and_save(flt, lambda net: _set_head(net.backbone, [0.0, 5.0]))  # every slice: lung

    pipe = CTCovidPipeline(bundle_dir=variant, device="cpu", skip_missing=True)
    scan = totalseg_dir / "example_ct_sm.nii.gz"  # 30 slices, lung in the upper 11 only
    result = pipe(scan)
    assert result.slice_selection == "slice_filter" and result.stages["slice_filter"] == "ok"
    assert result.kept_slices == list(range(30))
    by_area = LungSlicesFromMask(min_area=pipe.min_lung_area)(torch.from_numpy(result.lung_mask)[None])
    assert int(by_area.sum()) >= 1  # the mask-area rule finds lung slices ...

    _set_head(pipe.slice_filter.network.backbone, [5.0, 0.0])  # every slice: not lung
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

    # the full run: a is skipped as done, the others are computed; summary lists all three
    full = run_batch([scans], out, pipeline, progress=False)
    assert [(r["scan_id"], r["status"]) for r in full.rows] == [
        ("a", "skipped-done"),
        ("b", "ok"),
        ("c", "ok"),
    ]
    assert (out / "a.json").stat().st_mtime_ns == stamp  # not rewritten
    rows = _read_csv(out / "summary.csv")
    assert [r["status"] for r in rows] == ["skipped-done", "ok", "ok"]
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
    assert [r["status"] for r in again.rows] == ["skipped-done", "skipped-done", "ok"]

    # a done scan whose output was deleted is not done any more
    (out / "b_montage.png").unlink()
    # --force recomputes everything
    forced = run_batch([scans / "a.nii.gz"], out, pipeline, force=True, progress=False)
    assert [r["status"] for r in forced.rows] == ["ok"]
    assert (out / "a.json").stat().st_mtime_ns != stamp
    last = run_batch([scans], out, pipeline, progress=False)
    assert [r["status"] for r in last.rows] == ["skipped-done", "ok", "skipped-done"]


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


# ---------------------------------------------------------------------------------- performance options
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_bf16_autocast_moves_outputs_little(pipeline, test_bundles, shared_data):
    """bf16 autocast (issue 9) on the shipped segmenter: same lung mask to within a few edge pixels, the
    ensembles' probabilities to within 0.01, the same Grad-CAM, and the precision is part of the resume key."""
    from ctcovid.ct import CTCovidPipeline

    scan = data_path("fixtures", "lungmask_testdata")
    bf16 = CTCovidPipeline(bundle_dir=test_bundles, device="cpu", severity="always", precision="bf16")
    assert bf16.options()["precision"] == "bf16" and pipeline.options()["precision"] == "fp32"
    assert bf16.batch_size == 8  # the batch measured fastest per slice in bf16 on CPU
    ref, res = pipeline(scan), bf16(scan)
    assert res.lung_mask.sum() > 10_000  # the lungs of both slices, not an empty mask
    assert _dice(ref.lung_mask, res.lung_mask) >= 0.98
    assert abs(ref.covid_probability - res.covid_probability) < 0.01
    for name, p in ref.severity_probabilities.items():
        assert abs(p - res.severity_probabilities[name]) < 0.01
    # Grad-CAM stays fp32 under bf16 (an explanation must not depend on a speed option): the same map
    np.testing.assert_allclose(res.heatmap, ref.heatmap, atol=1e-4)
    with pytest.raises(ValueError, match="precision"):
        CTCovidPipeline(bundle_dir=test_bundles, device="cpu", precision="fp8")


def test_channels_last_and_batch_size_do_not_change_results(pipeline, test_bundles, shared_data):
    """Memory format, batch size and batch-norm folding are speed settings: the bundles' ``channels_last``
    values are applied and the segmenter's batch norms folded by default, and switching them off (or
    changing the batch size) leaves the mask and probabilities unchanged."""
    from ctcovid.ct import CTCovidPipeline
    from ctcovid.ct.network_runner import DEFAULT_BATCH_SIZE

    scan = data_path("fixtures", "lungmask_testdata")
    default = CTCovidPipeline(bundle_dir=test_bundles, device="cpu", severity="always")
    assert default.batch_size == DEFAULT_BATCH_SIZE["cpu"]["fp32"]
    bundle_says = {
        s: bool(json.loads((test_bundles / b / "configs" / "inference.json").read_text())["channels_last"])
        for s, b in (("segmentation", SEG_BUNDLE), ("detection", DET_BUNDLE), ("severity", SEV_BUNDLE))
    }
    assert default.channels_last == bundle_says  # the slice filter has no weights here
    conv = next(m for m in default.segmenter.network.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == bundle_says["segmentation"]

    flipped = CTCovidPipeline(
        bundle_dir=test_bundles,
        device="cpu",
        severity="always",
        batch_size=1,
        channels_last=False,
        fold_batchnorm=False,
    )
    assert not any(flipped.channels_last.values())

    def batchnorms(p):
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in p.segmenter.network.modules())

    assert default.folded_batchnorms == {"segmentation": 22} and flipped.folded_batchnorms == {"segmentation": 0}
    assert batchnorms(default) == batchnorms(flipped) - 22
    ref, res = pipeline(scan), flipped(scan)  # pipeline: batch 8 with the bundles' formats
    assert _dice(ref.lung_mask, res.lung_mask) > 0.9999
    assert abs(ref.covid_probability - res.covid_probability) < 1e-4
    for name, p in ref.severity_probabilities.items():
        assert abs(p - res.severity_probabilities[name]) < 1e-4


def test_stage_progress_and_volume_building_timing(pipeline, shared_data):
    """Stages are announced in run order; building the ensembles' stacks is timed on its own."""
    seen: list[str] = []
    volume = pipeline.read(data_path("fixtures", "lungmask_testdata"))
    res = pipeline.process(volume, on_stage=seen.append)
    assert seen == [
        "normalize",
        "segmentation",
        "mask_cleanup",
        "volume_building",
        "detection",
        "gradcam",
        "volume_building",
        "severity",
    ]
    assert res.stages["volume_building"] == "ok"
    assert {"normalize", "segmentation", "volume_building", "detection", "gradcam", "severity"} <= set(
        res.timings_s
    )


def test_handed_over_volume_is_freed_once_normalised(pipeline, shared_data):
    """A volume passed straight into ``process`` (as ``__call__`` and the batch runner pass it) is freed as
    soon as its normalised views exist, not kept beside them for the whole scan."""
    import weakref

    refs: list[weakref.ref] = []
    alive_at: dict[str, bool] = {}

    def read_and_watch():
        volume = pipeline.read(data_path("fixtures", "lungmask_testdata"))
        refs.append(weakref.ref(volume))
        return volume

    res = pipeline.process(read_and_watch(), on_stage=lambda s: alive_at.setdefault(s, refs[0]() is not None))
    assert alive_at["normalize"] is True  # still needed while normalising
    assert alive_at["segmentation"] is False and refs[0]() is None
    assert res.covid_probability is not None and res.severity is not None  # later stages had their views
    # a caller that keeps its own reference keeps its volume, unchanged
    kept = pipeline.read(data_path("fixtures", "lungmask_testdata"))
    before = kept.clone()
    pipeline.process(kept)
    assert torch.equal(kept, before)


def test_take_slices_views_consecutive_runs():
    from ctcovid.ct.context import take_slices

    vol = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    run = take_slices(vol, [1, 2, 3])
    assert torch.equal(run, vol[..., 1:4]) and run.data_ptr() == vol[..., 1:4].data_ptr()  # no copy
    gathered = take_slices(vol, [0, 2, 5])
    assert torch.equal(gathered, vol[..., [0, 2, 5]])


@pytest.mark.parametrize("connectivity", [1, 3])
@pytest.mark.parametrize("num_components", [1, 2])
def test_keep_largest_components_matches_monai(connectivity, num_components):
    """The pipeline's 32-bit connected-component clean-up gives MONAI's KeepLargestConnectedComponent result,
    also on the mask's bounding box (``_clean_mask``) rather than the whole volume."""
    from monai.transforms import KeepLargestConnectedComponent

    from ctcovid.ct.mask_cleanup import bounding_box, keep_largest_components

    mask = np.zeros((40, 30, 20), dtype=np.uint8)
    mask[5:15, 5:15, 5:15] = 1  # 1000 voxels
    mask[20:26, 5:11, 5:11] = 1  # 216
    mask[26, 11, 11] = 1  # touches the 216 block only diagonally: joins it with full connectivity
    mask[30:33, 20:23, 2:5] = 1  # 27
    mask[38, 28, 18] = 1  # a single voxel near the edge
    monai_keep = KeepLargestConnectedComponent(
        applied_labels=[1], num_components=num_components, connectivity=connectivity
    )
    ref = monai_keep(torch.from_numpy(mask.copy())[None])[0].numpy()  # a copy: MONAI edits its input in place
    out = keep_largest_components(mask.copy(), num_components, connectivity)
    np.testing.assert_array_equal(out, ref)
    assert out.sum() < mask.sum()  # something was removed
    box = bounding_box(mask, margin=1)
    boxed = mask.copy()
    boxed[box] = keep_largest_components(np.ascontiguousarray(mask[box]), num_components, connectivity)
    np.testing.assert_array_equal(boxed, ref)
    assert bounding_box(np.zeros((3, 3, 3), np.uint8)) is None


def test_keep_largest_components_beyond_16_bit_labels():
    """More components than 16-bit labels hold (isolated voxels on every other grid point): the clean-up
    falls back to 32-bit labels and still gives MONAI's result."""
    from monai.transforms import KeepLargestConnectedComponent

    from ctcovid.ct.mask_cleanup import keep_largest_components

    mask = np.zeros((104, 104, 104), dtype=np.uint8)
    mask[::2, ::2, ::2] = 1  # 52**3 = 140608 one-voxel components under 6-connectivity
    mask[:10, :10, :10] = 1  # one 1000-voxel block
    mask[-6:, -6:, -6:] = 1  # and a 216-voxel one
    ref = KeepLargestConnectedComponent(applied_labels=[1], num_components=2, connectivity=1)(
        torch.from_numpy(mask.copy())[None]
    )[0].numpy()
    out = keep_largest_components(mask.copy(), 2, 1)
    np.testing.assert_array_equal(out, ref)
    assert 1000 + 216 <= out.sum() < mask.sum() // 50  # the two blocks (and the grid points they touch)


def test_montage_frees_its_tile_images_without_the_cycle_collector(tmp_path):
    """matplotlib's artists refer to each other; the montage clears its figure so the tiles' image
    arrays (~140 MB for 16 tiles of 512x512) are freed at once, not at some later garbage collection."""
    import gc

    from ctcovid.ct.montage import save_montage_png

    rng = np.random.default_rng(0)
    image = rng.random((96, 96, 6), dtype=np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[20:70, 20:70] = 1
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what only the cycle collector would free lands in gc.garbage
    try:
        out = save_montage_png(tmp_path / "m.png", image, mask, range(6), heatmap=image[..., 0], title="t")
        gc.collect()
        stranded = [o.shape for o in gc.garbage if isinstance(o, np.ndarray) and o.size >= 96 * 96]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert out.is_file()
    assert stranded == []
