"""The infection stage on real scans: lesion mask, involvement, grade, outputs, and what happens without weights.

MedSeg ``rp4`` and ``rp8`` are held out from the lesion model's training (``bundles/ct_lung_infection_segmentation``
datalist ``test``); their reference infection masks (any non-zero) and lung masks give the expected answers.
The accuracy floors sit below what the shipped model measured (bundle docs: rp8 Dice 0.52, involvement error
1.6 points; rp4 Dice 0.28, diffuse ground glass under-read), so a regression fails them.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from ct_fixtures import INFECTION_BUNDLE, SEG_BUNDLE, copy_configs

from ctcovid.bundle import bundles_root

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _shipped() -> bool:
    return (bundles_root() / INFECTION_BUNDLE / "models" / "model.pt").is_file()


@pytest.fixture(scope="module")
def lesion_pipeline(tmp_path_factory):
    import shutil

    from ctcovid.ct import CTCovidPipeline

    if not _shipped():
        pytest.skip(f"{INFECTION_BUNDLE} has no shipped weights")
    root = tmp_path_factory.mktemp("lesion_bundles")
    for name in (SEG_BUNDLE, INFECTION_BUNDLE):
        shutil.copytree(bundles_root() / name, root / name)
    return CTCovidPipeline(bundle_dir=root, device="cpu", gradcam=False)


@pytest.fixture(scope="module")
def heldout_run(lesion_pipeline, medseg_dir, tmp_path_factory):
    from ctcovid.running import run_batch

    out = tmp_path_factory.mktemp("heldout_run")
    inputs = [medseg_dir / "images" / f"{case}.nii.gz" for case in ("rp4", "rp8")]
    report = run_batch(inputs, out, lesion_pipeline, progress=False)
    assert [r["status"] for r in report.rows] == ["ok", "ok"], report.rows
    return out


def _reference(medseg_dir, case: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    ref = np.asarray(nib.load(medseg_dir / "infection_masks" / f"{case}.nii.gz").dataobj) > 0
    lung = np.asarray(nib.load(medseg_dir / "lung_masks" / f"{case}.nii.gz").dataobj) > 0
    return ref, lung


def test_lesions_on_a_held_out_covid_scan(heldout_run, medseg_dir):
    import nibabel as nib

    src = nib.load(medseg_dir / "images" / "rp4.nii.gz")
    inf = nib.load(heldout_run / "rp4_infection_mask.nii.gz")
    lung = nib.load(heldout_run / "rp4_lung_mask.nii.gz")
    # the input's own geometry, like the lung mask
    assert inf.shape == src.shape and np.allclose(inf.affine, src.affine, atol=1e-4)
    pred = np.asarray(inf.dataobj)
    assert pred.dtype == np.uint8 and set(np.unique(pred)) == {0, 1}
    lung_m = np.asarray(lung.dataobj) > 0
    assert not (pred.astype(bool) & ~lung_m).any()  # lesions are lung: all inside the (grown) lung mask

    ref, ref_lung = _reference(medseg_dir, "rp4")
    dice = 2.0 * (ref & (pred > 0)).sum() / (ref.sum() + pred.sum())
    assert dice > 0.3, f"lesion Dice {dice:.3f} on held-out rp4"
    rec = json.loads((heldout_run / "rp4.json").read_text())["infection"]
    ref_pct = 100.0 * (ref & ref_lung).sum() / ref_lung.sum()  # 13.75 %: the model reads ~3.7 %
    assert 1.0 < rec["lung_involvement_percent"] < ref_pct, (rec["lung_involvement_percent"], ref_pct)
    assert rec["ct_severity_grade"] == "CT-1" and rec["ct_severity_source"] == "involvement"
    # the record describes these very masks
    voxel_ml = abs(np.linalg.det(src.affine[:3, :3])) / 1000.0
    assert rec["infection_volume_ml"] == pytest.approx(pred.sum() * voxel_ml, rel=1e-6)
    assert rec["lung_involvement_percent"] == pytest.approx(100.0 * pred.sum() / lung_m.sum(), rel=1e-6)
    sides = rec["lungs"]
    assert sides["right"]["volume_ml"] + sides["left"]["volume_ml"] == pytest.approx(lung_m.sum() * voxel_ml)
    assert sides["right"]["infection_volume_ml"] + sides["left"]["infection_volume_ml"] == pytest.approx(
        rec["infection_volume_ml"]
    )
    # each side holds one lung, not a sliver (which side is which: tests/test_ct_involvement.py)
    assert 0.35 < sides["right"]["volume_ml"] / (lung_m.sum() * voxel_ml) < 0.65


def test_lesions_and_involvement_on_a_second_held_out_scan(heldout_run, medseg_dir):
    import nibabel as nib

    pred = np.asarray(nib.load(heldout_run / "rp8_infection_mask.nii.gz").dataobj) > 0
    ref, ref_lung = _reference(medseg_dir, "rp8")
    dice = 2.0 * (ref & pred).sum() / (ref.sum() + pred.sum())
    assert dice > 0.5, f"lesion Dice {dice:.3f} on held-out rp8"
    rec = json.loads((heldout_run / "rp8.json").read_text())["infection"]
    ref_pct = 100.0 * (ref & ref_lung).sum() / ref_lung.sum()  # 1.47 %
    assert abs(rec["lung_involvement_percent"] - ref_pct) < 3.0, (rec["lung_involvement_percent"], ref_pct)
    assert rec["ct_severity_grade"] == "CT-1"
    lung = np.asarray(nib.load(heldout_run / "rp8_lung_mask.nii.gz").dataobj) > 0
    assert (ref & lung).sum() / ref.sum() >= 0.95  # the lesions are inside the lung mask


def test_consolidation_outside_the_lung_mask_is_added_to_it(lesion_pipeline, medseg_dir):
    """MedSeg rp2: the lung segmenter alone leaves 21 % of its reference lesions (dense consolidation)
    outside the lung mask; the lesion stage puts most of them back (measured with lung weights 0.3.0:
    78.8 % -> 90.3 % inside; the 0.2.x weights: 82.9 % -> 94.2 %)."""
    import copy

    image = medseg_dir / "images" / "rp2.nii.gz"
    ref, ref_lung = _reference(medseg_dir, "rp2")
    lung_only = copy.copy(lesion_pipeline)
    lung_only.stages = [s for s in lesion_pipeline.stages if s.name != "infection"]
    before = lung_only(image)
    after = lesion_pipeline(image)
    share = [(ref & (r.lung_mask > 0)).sum() / ref.sum() for r in (before, after)]
    assert share[1] >= 0.88 and share[1] > share[0] + 0.08, share
    added = (after.lung_mask > 0) & ~(before.lung_mask > 0)
    assert added.sum() == after.lung_mask_added_voxels > 0
    assert (added & (after.infection_mask > 0)).sum() == added.sum()  # only lesion voxels were added
    assert not ((before.lung_mask > 0) & ~(after.lung_mask > 0)).any()  # nothing removed


def test_summary_and_console_show_involvement(heldout_run):
    from ctcovid.cli.predict import scan_line

    with open(heldout_run / "summary.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["scan_id"] == "rp4")
    rec = json.loads((heldout_run / "rp4.json").read_text())
    assert float(row["lung_involvement_percent"]) == pytest.approx(rec["infection"]["lung_involvement_percent"], abs=0.01)
    assert row["ct_severity_grade"] == "CT-1" and row["infection_status"] == "ok"
    line = scan_line(row)
    assert f"involvement {float(row['lung_involvement_percent']):.1f}% (CT-1)" in line and " ml" in line


def test_montage_shows_lesion_slices(heldout_run):
    from PIL import Image

    rec = json.loads((heldout_run / "rp4.json").read_text())
    with Image.open(heldout_run / rec["outputs"]["montage"]) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert red.sum() > 200  # lesions are drawn in red on the tiles


def test_missing_lesion_model_is_skipped_with_the_reason(tmp_path, medseg_dir):
    import shutil

    from ctcovid.bundle import MissingWeightsError
    from ctcovid.ct import CTCovidPipeline
    from ctcovid.running import run_batch

    root = tmp_path / "bundles"
    shutil.copytree(bundles_root() / SEG_BUNDLE, root / SEG_BUNDLE)
    copy_configs(INFECTION_BUNDLE, root)  # configs, no weights
    out = tmp_path / "out"
    pipeline = CTCovidPipeline(bundle_dir=root, device="cpu", gradcam=False)
    report = run_batch([medseg_dir / "images" / "rp6.nii.gz"], out, pipeline, progress=False)
    assert report.rows[0]["status"] == "ok"
    rec = json.loads((out / "rp6.json").read_text())
    assert rec["infection"] is None and rec["stages"]["infection"].startswith("skipped: no trained weights")
    assert not list(out.glob("*infection_mask*"))
    with open(out / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["lung_involvement_percent"] == "" and row["ct_severity_grade"] == ""
    assert row["infection_status"].startswith("skipped: no trained weights")
    with pytest.raises(MissingWeightsError, match=INFECTION_BUNDLE):
        CTCovidPipeline(bundle_dir=root, device="cpu", skip_missing=False)


def test_committed_datalist_is_rebuilt_exactly_and_keeps_test_patients_out(shared_data):
    """The split rules (ctcovid.training.infection_datalist): what is committed is what the builder makes from
    ../shared/data, and no slice of a test patient (MedSeg rp4 / rp8, their Ma et al. copies) trains or validates."""
    from ctcovid.training import default_data_root
    from ctcovid.training.infection_datalist import TEST_CASES, build_infection_datalist

    built = build_infection_datalist(default_data_root())
    committed = json.loads((bundles_root() / INFECTION_BUNDLE / "configs" / "datalist.json").read_text())
    assert built == committed
    used = built["training"] + built["validation"]
    assert not any(case in it["case"] for it in used for case in TEST_CASES)
    assert [it["case"] for it in built["test"]] == list(TEST_CASES)
    assert {it["case"] for it in used if it["source"] == "medseg"} == {"rp2", "rp6"}
    assert all(it["label_threshold"] == 0 for it in used + built["test"] if it["source"] == "medseg")
    excluded = {e["group"] for e in built["excluded"]}
    assert excluded == {"rp4", "rp8"} and len(built["excluded"]) == 46
    assert {it["case"] for it in built["validation"]} == {"ma2020/ma0970", "ma2020/ma1376"}
    train_ma = {it["image"] for it in built["training"] if it["source"] == "ma2020"}
    assert train_ma.isdisjoint(it["image"] for it in built["validation"])
    # the Ma et al. PNGs are CLAHE images already: flagged so training does not equalise them twice
    assert all(it.get("equalised", False) == (it["source"] == "ma2020") for it in used)


def test_training_equalises_each_image_once(shared_data):
    """The train and validation preprocessing of train.json run CLAHE on CT slices and leave the slices
    flagged ``equalised`` (the Ma et al. CLAHE PNGs) as they are; the flag reaches every sample."""
    import torch
    from monai.bundle import ConfigParser

    from ctcovid.training import lung_slice_items
    from ctcovid.transforms import CLAHE

    conf = ConfigParser()
    conf.read_config(str(bundles_root() / INFECTION_BUNDLE / "configs" / "train.json"))
    datalist = json.loads((bundles_root() / INFECTION_BUNDLE / "configs" / "datalist.json").read_text())
    ma = next(it for it in datalist["validation"] if it["source"] == "ma2020")
    items = lung_slice_items([{**ma, **{k: str(shared_data / ma[k]) for k in ("image", "label")}}])
    assert len(items) == 1 and items[0]["equalised"] is True
    ct = {**items[0], "equalised": False}
    validate = conf.get_parsed_content("validate#preprocessing")
    assert torch.equal(validate(dict(items[0]))["image"], items[0]["image"])
    assert torch.equal(validate(dict(ct))["image"], CLAHE(clip_limit=conf["clahe_clip_limit"])(ct["image"]))
    last = conf.get_parsed_content("train#augmentation")[-2]  # CLAHE, after the intensity augmentation
    assert type(last).__name__ == "CLAHEd" and last.skip_key == "equalised"


def test_full_disk_while_writing_fails_the_scan_and_leaves_no_partial_outputs(tmp_path, monkeypatch, medseg_dir):
    """The disk fills up after the masks are written, at the montage: the scan is recorded failed with the
    reason, its masks are removed again, no temporary file remains, and the batch goes on."""
    import errno

    import ctcovid.ct.montage as montage
    from ctcovid.ct import CTCovidPipeline
    from ctcovid.running import run_batch

    if not _shipped():
        pytest.skip(f"{INFECTION_BUNDLE} has no shipped weights")

    def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    import nibabel as nib

    src = nib.load(medseg_dir / "images" / "rp4.nii.gz")
    scan = tmp_path / "rp4_six.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj[:, :, 16:22], dtype=np.float32), src.affine), scan)
    monkeypatch.setattr(montage, "save_montage_png", disk_full)
    out = tmp_path / "out"
    pipeline = CTCovidPipeline(device="cpu", gradcam=False)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a NIfTI file")
    report = run_batch([scan, corrupt], out, pipeline, progress=False)
    assert [r["status"] for r in report.rows] == ["failed", "failed"]  # the batch went on to the next input
    assert "No space left on device" in report.rows[0]["reason"]
    rec = json.loads((out / "rp4_six.json").read_text())
    assert rec["status"] == "failed" and "No space left" in rec["reason"]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["corrupt.json", "rp4_six.json", "summary.csv"], names  # no mask, no temporary file


def test_rerun_recomputes_a_scan_whose_lesion_mask_was_deleted(heldout_run, lesion_pipeline, medseg_dir, tmp_path):
    """Resume trusts a finished record only while every file it lists is still there (the lesion mask is not
    one of the outputs every scan has, so it is checked from the record's ``outputs``)."""
    import shutil

    from ctcovid.running import run_batch

    out = shutil.copytree(heldout_run, tmp_path / "out")
    (out / "rp8_infection_mask.nii.gz").unlink()
    inputs = [medseg_dir / "images" / f"{case}.nii.gz" for case in ("rp4", "rp8")]
    report = run_batch(inputs, out, lesion_pipeline, progress=False)
    reused = {r["scan_id"]: r["reused"] for r in report.rows}
    assert reused == {"rp4": True, "rp8": False}
    assert (out / "rp8_infection_mask.nii.gz").is_file()
