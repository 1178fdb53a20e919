"""Shared pytest fixtures.

Real data lives in ``../shared/data`` (next to the project root) or wherever ``CTCOVID_DATA`` points.
Tests that need it skip with the reason when it is absent; they never download anything.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

#: fixtures shared by several test modules, kept out of this file (one job each)
pytest_plugins = ["ct_fixtures"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray pretrained load must fail fast, never download

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("CTCOVID_DATA", PROJECT_ROOT.parent / "shared" / "data")).resolve()


#: The CT bundles ``seg_only_bundles`` copies without weights (only the lung segmenter ships weights).
WEIGHTLESS_CT_BUNDLES = ("ct_lung_slice_filter", "ct_covid_classification", "ct_covid_severity_classification")


def data_path(*parts: str) -> Path:
    """Path under the shared data folder; skips the calling test with a clear reason if it is absent."""
    path = DATA_ROOT.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (set CTCOVID_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def seg_only_bundles(tmp_path_factory) -> Path:
    """The shipped lung and lesion segmenters (linked, read-only; the lesion one when its weights ship) and
    the other CT bundles' configs without weights: a fresh checkout as a user gets it, every weightless
    stage skipped or refused as a user would see it."""
    from ctcovid.bundle import bundles_root

    seg = bundles_root() / "ct_lung_segmentation"
    if not (seg / "models" / "model.pt").is_file():
        pytest.skip(f"the lung segmenter has no shipped weights yet ({seg / 'models' / 'model.pt'})")
    root = tmp_path_factory.mktemp("seg_only_bundles")
    os.symlink(seg, root / seg.name)
    lesion = bundles_root() / "ct_lung_infection_segmentation"
    if (lesion / "models" / "model.pt").is_file():
        os.symlink(lesion, root / lesion.name)
    else:
        shutil.copytree(lesion / "configs", root / lesion.name / "configs")
        (root / lesion.name / "models").mkdir()
    for name in WEIGHTLESS_CT_BUNDLES:
        shutil.copytree(bundles_root() / name / "configs", root / name / "configs")
        (root / name / "models").mkdir()
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared real data (skips when absent)."""
    return data_path()


@pytest.fixture(scope="session")
def covid_ct_md_series() -> Path:
    """COVID-CT-MD normal002: 167-slice JPEG-lossless HU DICOM series."""
    return data_path("ct", "covid_ct_md", "normal002")


@pytest.fixture(scope="session")
def totalseg_dir() -> Path:
    """TotalSegmentator example CT (NIfTI + JPEG 2000 DICOM series + lobe labels)."""
    return data_path("fixtures", "totalsegmentator_example_ct")


@pytest.fixture(scope="session")
def medseg_dir() -> Path:
    """MedSeg display-valued (0-4095) CT volumes with lung masks."""
    return data_path("ct", "medseg")


@pytest.fixture(autouse=True)
def _ieee_subnormals_after_each_test():
    """Tests that run ``ctcovid predict``/``demo`` in-process get its flush-denormal processor setting; put
    IEEE subnormals back afterwards so later tests (numpy, hypothesis) see the default floating point."""
    yield
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_flush_denormal(False)


@pytest.fixture
def no_weight_download(monkeypatch):
    """Any attempt to fetch pretrained weights fails the test (``HF_HUB_OFFLINE`` also blocks the hub).
    Use with ``pytestmark = pytest.mark.usefixtures("no_weight_download")``."""
    import timm
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("a network tried to load pretrained weights")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"

