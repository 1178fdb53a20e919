"""An installed wheel works without the source tree: it carries the bundles (configs, licences, shipped
weights) and ``ctcovid info``, ``ctcovid demo`` and ``ctcovid predict`` run from it.

The wheel is built from this checkout with pip (PEP 517, as a user would) and installed with ``--target``
into a fresh folder that is the only ctcovid on ``PYTHONPATH``; its dependencies come from the test
environment (installing torch and MONAI again would only test pip). Commands run from a folder outside
the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, data_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(PROJECT_ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (root / "dist").glob("ctcovid-*.whl")
    target = root / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    cwd = root / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    env.pop("CTCOVID_BUNDLE_DIR", None)
    return {"wheel": wheel, "target": target, "cwd": cwd, "env": env}


def _run(installed, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True, timeout=600
    )


def test_wheel_carries_the_bundles_and_no_run_outputs(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    for bundle in ("ct_lung_segmentation", "cxr_lung_segmentation", "cxr_vbreathnet_classification"):
        assert f"ctcovid/_bundles/{bundle}/models/model.pt" in names
    assert "ctcovid/_bundles/ct_covid_classification/configs/inference.json" in names
    assert "ctcovid/_bundles/ct_lung_segmentation/docs/data_license.txt" in names
    assert not [n for n in names if "/eval/" in n or "/predictions/" in n or "__pycache__" in n]


def test_installed_wheel_finds_its_bundles_and_runs(installed, tmp_path):
    where = _run(installed, "-c", "import ctcovid, ctcovid.bundle as b; print(ctcovid.__file__); print(b.bundles_root())")
    assert where.returncode == 0, where.stderr
    package_file, bundles = where.stdout.split()
    assert Path(package_file).is_relative_to(installed["target"])  # not the checkout
    assert Path(bundles) == installed["target"] / "ctcovid" / "_bundles"

    info = _run(installed, "-m", "ctcovid", "info")
    assert info.returncode == 0, info.stderr
    assert "ct_lung_segmentation" in info.stdout and "not found" not in info.stdout

    demo = _run(installed, "-m", "ctcovid", "demo")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (installed["cwd"] / "ctcovid_demo_output" / "summary.csv").is_file()

    scan = data_path("fixtures", "lungmask_testdata")
    predict = _run(installed, "-m", "ctcovid", "predict", str(scan), "--out", str(tmp_path / "out"), "--no-progress")
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert (tmp_path / "out" / "lungmask_testdata_lung_mask.nii.gz").is_file()
