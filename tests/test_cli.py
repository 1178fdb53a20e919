"""The ``ctcovid`` command line: predict / demo / info, exit codes and messages.

Most tests call :func:`ctcovid.cli.main.main` in-process (same parser, same exit codes, no second torch
import); ``ctcovid demo`` runs once as a real subprocess, as a user would run it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT_ROOT, data_path

import ctcovid
from ctcovid.cli.main import main
from ctcovid.cli.predict import EXIT_MODELS, EXIT_OK, EXIT_SCANS_FAILED, EXIT_USAGE

SEG_BUNDLE = "ct_lung_segmentation"
DET_BUNDLE = "ct_covid_classification"
SEV_BUNDLE = "ct_covid_severity_classification"
FILTER_BUNDLE = "ct_lung_slice_filter"


def test_help_lists_commands_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text and "--require-all" in text and "--severity" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("predict", "demo", "info"):
        assert command in text


def test_missing_input_is_a_usage_error(tmp_path, capsys):
    missing = tmp_path / "no_such_scan.nii.gz"
    code = main(["predict", str(missing), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "ctcovid predict: error:" in err and str(missing) in err and "not found" in err
    assert not (tmp_path / "out").exists()  # nothing was run


@pytest.mark.parametrize("command", [["predict"], ["demo"], ["cxr", "predict"]])
@pytest.mark.parametrize("where", ["file_in_the_way", "cannot_create"])
def test_unwritable_output_folder_is_a_usage_error_and_nothing_is_written(command, where, tmp_path, capsys):
    """One line naming the folder, exit 2, no traceback, before any model loads; nothing written anywhere."""
    blocker = tmp_path / "results"
    blocker.write_text("a file where the output folder should go")
    out = blocker / "run1" if where == "cannot_create" else blocker
    scan = str(PROJECT_ROOT / "ctcovid" / "demo_data" / "chest_ct_2_slices")
    argv = {"predict": [scan, "--allow-2d"], "demo": [], "cxr": [scan]}[command[0]]
    before = sorted(tmp_path.rglob("*"))
    assert main([*command, *argv, "--out", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(blocker) in lines[0]
    assert ("in the way" if where == "file_in_the_way" else "cannot be created") in lines[0]
    assert sorted(tmp_path.rglob("*")) == before


def test_bad_option_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", str(tmp_path), "--out", str(tmp_path / "o"), "--batch-size", "0"])
    assert e.value.code == EXIT_USAGE
    assert "--batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["predict", str(tmp_path), "--out", str(tmp_path / "o"), "--severity", "sometimes"])
    assert e.value.code == EXIT_USAGE


def test_missing_weights_refused_only_with_require_all(seg_only_bundles, tmp_path, capsys):
    scan = data_path("fixtures", "lungmask_testdata")
    argv = [
        "predict",
        str(scan),
        "--out",
        str(tmp_path / "out"),
        "--bundle-dir",
        str(seg_only_bundles),
        "--no-progress",
    ]
    assert main([*argv, "--require-all"]) == EXIT_MODELS
    err = capsys.readouterr().err
    assert f"bundle {DET_BUNDLE}" in err and "train.json" in err and "--require-all" in err
    assert not (tmp_path / "out").exists()

    # the default runs every stage that has weights and says plainly which did not run, and why
    assert main(argv) == EXIT_OK
    captured = capsys.readouterr()
    assert "detection: not run (no trained weights" in captured.err and DET_BUNDLE in captured.err
    assert "severity: not run (no trained weights" in captured.err
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "ok" and row["covid_probability"] == "" and row["severity"] == ""
    assert row["detection_status"].startswith("skipped: no trained weights") and DET_BUNDLE in row["detection_status"]
    assert row["severity_status"].startswith("skipped: no trained weights")
    assert float(row["lung_volume_ml"]) > 0 and row["lung_volume_status"] == "ok"
    record = json.loads((tmp_path / "out" / f"{row['scan_id']}.json").read_text())
    assert record["run"]["precision"] == "fp32" and record["run"]["device"] == "cpu"
    assert record["run"]["ctcovid"] == ctcovid.__version__ and record["run"]["torch"] and record["run"]["monai"]


def test_predict_corrupt_scan_exit_code_and_summary(seg_only_bundles, tmp_path, capsys):
    good = data_path("fixtures", "lungmask_testdata")
    bad = tmp_path / "bad_series"
    bad.mkdir()
    for i in range(3):
        (bad / f"IM{i:04d}.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 10)  # truncated DICOM
    out = tmp_path / "out"
    opts = ["--out", str(out), "--bundle-dir", str(seg_only_bundles), "--skip-missing", "--no-progress"]
    code = main(["predict", str(bad), str(good), *opts])
    assert code == EXIT_SCANS_FAILED
    captured = capsys.readouterr()
    assert "1 ok (0 reused from an earlier run), 1 failed" in captured.out and "failed: bad_series:" in captured.out
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["scan_id"], r["status"]) for r in rows] == [
        ("bad_series", "failed"),
        ("lungmask_testdata", "ok"),
    ]
    assert "bad_series" in rows[0]["reason"]
    # the same command again: the good scan is done, the bad one is retried (and fails again)
    assert main(["predict", str(bad), str(good), *opts]) == EXIT_SCANS_FAILED
    assert "1 ok (1 reused from an earlier run), 1 failed" in capsys.readouterr().out
    # only the good scan: all done -> exit 0
    assert main(["predict", str(good), *opts]) == EXIT_OK


def test_info_reports_bundles_and_hashes(seg_only_bundles, capsys):
    assert main(["info", "--bundle-dir", str(seg_only_bundles), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["ctcovid"] and info["versions"]["torch"] and info["versions"]["monai"]
    assert info["versions"]["timm"] and info["versions"]["python"]
    assert isinstance(info["device"]["cuda_available"], bool)
    by_name = {b["bundle"]: b for b in info["bundles"]}
    seg = by_name[SEG_BUNDLE]
    weights = seg_only_bundles / SEG_BUNDLE / "models" / "model.pt"
    assert (
        seg["weights"] is True and seg["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    )
    assert by_name[FILTER_BUNDLE]["weights"] is False
    assert main(["info", "--bundle-dir", str(seg_only_bundles)]) == 0
    text = capsys.readouterr().out
    assert "cuda available" in text and SEG_BUNDLE in text and "no trained weights" in text


def test_demo_subprocess(tmp_path):
    """``ctcovid demo`` as a user runs it: default bundles, built-in input, prints where the outputs are."""
    from ctcovid.bundle import bundles_root

    if not (bundles_root() / SEG_BUNDLE / "models" / "model.pt").is_file():
        pytest.skip("the lung segmenter has no shipped weights yet")
    out = tmp_path / "demo_out"
    proc = subprocess.run(
        [sys.executable, "-m", "ctcovid", "demo", "--out", str(out), "--no-progress"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert f"Outputs are in {out}" in text
    for bundle in (FILTER_BUNDLE, DET_BUNDLE, SEV_BUNDLE):
        shipped = (bundles_root() / bundle / "models" / "model.pt").is_file()
        assert (
            (f"bundle {bundle} v" in text)
            if shipped
            else (f"no trained weights shipped in {bundles_root() / bundle}" in text)
        )
    rec = json.loads((out / "chest_ct_2_slices.json").read_text())
    assert rec["status"] == "ok" and rec["slices"]["read"] == 2 and rec["scan"]["format"] == "dicom"
    assert (out / "chest_ct_2_slices_montage.png").is_file()
    # the built-in chest CT's mask holds both lungs: two large components, one each side of the midline
    import nibabel as nib
    from scipy import ndimage

    mask = np.asarray(nib.load(out / "chest_ct_2_slices_lung_mask.nii.gz").dataobj)[:, :, 0] > 0
    labels, n = ndimage.label(mask)
    sizes = sorted(np.bincount(labels.ravel())[1:], reverse=True)
    assert n >= 2 and sizes[1] > 0.3 * sizes[0] and sizes[1] > 5000  # two lungs of similar size (pixels)
    centres = [ndimage.center_of_mass(labels == i)[0] for i in np.argsort(np.bincount(labels.ravel())[1:])[::-1][:2] + 1]
    assert min(centres) < mask.shape[0] / 2 < max(centres)
    assert 20 < rec["lung_volume_ml"] < 80  # 2 slices 1 mm apart of an adult chest at heart level
    with open(out / "summary.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok"]
    assert Path(out).resolve().is_dir()
