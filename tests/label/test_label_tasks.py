"""MONAI Label app pieces in-process (no server): the app folder, missing weights, DICOM conversion."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import data_path


def test_label_app_command_prints_the_app_folder(capsys, tmp_path):
    from ctcovid.cli.main import main

    assert main(["label-app"]) == 0
    out = capsys.readouterr()
    app = Path(out.out.strip())
    assert (app / "main.py").is_file()
    assert "monailabel start_server --app" in out.err  # the hint goes to stderr, stdout is only the path

    assert main(["label-app", "--copy-to", str(tmp_path / "app")]) == 0
    copied = Path(capsys.readouterr().out.strip())
    assert copied == (tmp_path / "app").resolve()
    assert (copied / "main.py").read_bytes() == (app / "main.py").read_bytes()


def test_app_class_is_found_the_way_monailabel_loads_it():
    from monailabel.utils.others.class_utils import get_class_of_subclass_from_file

    from ctcovid.label import app_dir

    cls = get_class_of_subclass_from_file("main", str(app_dir() / "main.py"), "MONAILabelApp")
    assert cls is not None and cls.__name__ == "CTCovidLabelApp"


def _runner(bundles: Path, model_dir: Path):
    from ctcovid.label.runner import PipelineRunner, RunnerOptions

    return PipelineRunner(RunnerOptions(bundle_dir=str(bundles), model_dir=str(model_dir)))


def test_segmentation_without_weights_is_a_clear_503(tmp_path, segmenter_only_bundles):
    from fastapi import HTTPException

    from ctcovid.label.infer import LungSegmentationInfer

    bare = tmp_path / "bundles"
    shutil.copytree(segmenter_only_bundles, bare, symlinks=True)
    os.unlink(bare / "ct_lung_segmentation" / "models" / "model.pt")
    task = LungSegmentationInfer(_runner(bare, tmp_path / "model"))
    missing = task.info()["weights_missing"]
    assert any(m.startswith("segmentation: no trained weights") for m in missing), missing
    ct = data_path("fixtures", "totalsegmentator_example_ct", "example_ct_sm.nii.gz")
    with pytest.raises(HTTPException) as e:
        task({"image": str(ct)})
    assert e.value.status_code == 503
    assert "no trained weights" in e.value.detail and "ct_lung_segmentation" in e.value.detail


def test_models_without_weights_answer_null_with_the_reason(tmp_path, segmenter_only_bundles):
    """Detection and severity ship no weights: listed, but their probabilities are null with the reason."""
    from ctcovid.label.infer import CovidClassificationInfer, LungSegmentationInfer

    runner = _runner(segmenter_only_bundles, tmp_path / "model")
    detection = CovidClassificationInfer(runner, "detection")
    assert detection.is_valid()
    assert any("detection: no trained weights shipped" in m for m in detection.info()["weights_missing"])

    ct = data_path("fixtures", "totalsegmentator_example_ct", "example_ct_sm.nii.gz")
    label_file, answer = detection({"image": str(ct)})
    assert label_file is None
    assert answer["available"] is False and answer["covid_probability"] is None
    assert "no trained weights" in answer["reason"] and "ct_covid_classification" in answer["reason"]

    severity = CovidClassificationInfer(runner, "severity")
    _, answer = severity({"image": str(ct)})
    assert answer["available"] is False and answer["probabilities"] is None
    assert "no trained weights" in answer["reason"]
    assert answer["cached"] is True  # the detection run's result

    mask_file, answer = LungSegmentationInfer(runner)({"image": str(ct)})
    try:
        assert answer["covid_probability"] is None and answer["severity_probabilities"] is None
        assert set(answer["reasons"]) == {"detection", "severity", "infection"}
        assert answer["lung_involvement_percent"] is None and answer["ct_severity_grade"] is None
        assert "no trained weights" in answer["reasons"]["infection"]
        assert answer["record"]["stages"]["segmentation"] == "ok"
        assert os.path.getsize(mask_file) > 0
    finally:
        os.unlink(mask_file)


def test_dicom_series_folders_become_nifti_studies(tmp_path):
    import nibabel as nib
    import numpy as np

    from ctcovid.io import load_ct
    from ctcovid.label.datastore import convert_dicom_series

    series = data_path("fixtures", "totalsegmentator_example_ct", "example_ct_dicom")
    os.symlink(series, tmp_path / "chest", target_is_directory=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a scan")
    (tmp_path / "labels").mkdir()  # the datastore's own folder: never a study

    outcome = convert_dicom_series(tmp_path)
    assert outcome["chest"] == "converted"
    assert outcome["notes"].startswith("skipped")
    assert "labels" not in outcome
    nii = nib.load(tmp_path / "chest.nii.gz")
    ref = load_ct(series)
    assert nii.shape == tuple(ref.shape[1:])
    np.testing.assert_allclose(nii.affine, np.asarray(ref.meta["affine"]), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(nii.dataobj, dtype=np.float32), ref[0].numpy())
    assert convert_dicom_series(tmp_path)["chest"] == "up to date"


def test_infer_image_must_be_a_study_id_or_a_file_monailabel_made(tmp_path):
    import tempfile

    from fastapi import HTTPException

    from ctcovid.label.access import check_infer_image, check_study_id

    ids = ["rp6", "ct_sm"]
    check_infer_image("rp6", ids)  # a study id
    upload = os.path.join(tempfile.gettempdir(), "tmpa1b2c3d4.nii.gz")  # MONAI Label's upload temp file
    check_infer_image(upload, ids)
    sessions = str(tmp_path / "sessions")
    check_infer_image(os.path.join(sessions, "abc", "image.nii.gz"), ids, sessions)
    for bad in ("/etc/passwd", "../rp6", "rp6/../../etc/passwd", os.path.join(tempfile.gettempdir(), "evil.nii.gz"),
                os.path.join(tempfile.gettempdir(), "tmpa1b2", "..", "..", "etc", "passwd"),
                os.path.join(sessions, "..", "x.nii.gz"), sessions, "RP6"):
        with pytest.raises(HTTPException) as e:
            check_infer_image(bad, ids, sessions)
        assert e.value.status_code == 404, bad
    with pytest.raises(HTTPException) as e:
        check_infer_image(None, ids)
    assert e.value.status_code == 422
    assert check_study_id("patient_01.v2") == "patient_01.v2"
    for bad in ("", ".hidden", "a/b", "..", "a" * 201, "x\\y"):
        with pytest.raises(HTTPException):
            check_study_id(bad)
