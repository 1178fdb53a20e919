"""Every bundle under bundles/ follows the model-zoo layout and verifies offline.

This is the cross-bundle contract; each bundle's own test file checks what its configs do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import ctcovid
from ctcovid.bundle import (
    BUNDLE_NAMES,
    bundle_path,
    bundles_root,
    load_bundle_metadata,
    verify_bundle_metadata,
)

REQUIRED_FILES = (
    "configs/metadata.json",
    "configs/inference.json",
    "configs/train.json",
    "configs/evaluate.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",  # the model zoo's convention: the third-party data's terms
    "LICENSE",
)

PRESENT = [name for name in BUNDLE_NAMES if (bundles_root() / name).is_dir()]


def test_known_bundles_present():
    """The bundle folders on disk are exactly the registered names (no stray or misspelt bundle)."""
    on_disk = {p.name for p in bundles_root().iterdir() if p.is_dir() and (p / "configs").is_dir()}
    assert on_disk <= set(BUNDLE_NAMES), f"unregistered bundles: {on_disk - set(BUNDLE_NAMES)}"
    assert PRESENT, "no bundle found under bundles/"


@pytest.mark.parametrize("name", PRESENT)
def test_bundle_layout(name):
    root = bundles_root() / name
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    assert not missing, f"{name}: missing {missing}"
    assert (root / "models").is_dir(), f"{name}: no models/ folder"


@pytest.mark.parametrize("name", PRESENT)
def test_metadata_verifies_offline(name):
    verify_bundle_metadata(bundle_path(name))
    meta = load_bundle_metadata(bundle_path(name))
    assert meta["version"] in meta["changelog"], f"{name}: current version missing from changelog"
    assert set(meta["network_data_format"]["inputs"]) == {"image"}
    assert set(meta["network_data_format"]["outputs"]) == {"pred"}
    # keys MONAI has renamed (it warns on every run of a bundle that still uses them)
    from monai.bundle.utils import DEPRECATED_ID_MAPPING

    assert not set(meta) & set(DEPRECATED_ID_MAPPING), f"{name}: deprecated metadata keys"
    assert meta["required_packages_version"]["ctcovid"] == ctcovid.__version__


#: Bundles whose paper-size network runs through ``verify_net_in_out`` at the metadata's input in the CPU
#: suite, with config overrides to check (the others: in their own test files, at reduced cost).
NET_IN_OUT = [
    ("ct_lung_segmentation", {}),
    ("ct_lung_slice_filter", {}),
    ("cxr_detl_classification", {}),
    ("cxr_vbreathnet_classification", {}),
    ("cxr_covid_resnet18_classification", {"use_cbam": False}),
    ("cxr_covid_resnet18_classification", {"use_cbam": True}),
    ("cxr_pneumonia_type_classification", {}),
    ("cxr_covid_viral_classification", {}),
]


@pytest.mark.parametrize(("name", "overrides"), NET_IN_OUT)
def test_verify_net_in_out(name, overrides):
    """The network the inference config builds takes the metadata's input and gives its output shape."""
    from monai.bundle import verify_net_in_out

    configs = Path(bundle_path(name)) / "configs"
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.json"),
        device="cpu",
        **overrides,
    )


@pytest.mark.parametrize("name", PRESENT)
def test_inference_config_keys_and_self_location(name):
    """Configs locate their bundle through ctcovid.bundle.bundle_path, so they run from any directory."""
    with open(bundles_root() / name / "configs" / "inference.json", encoding="utf-8") as f:
        cfg = json.load(f)
    for key in ("imports", "bundle_root", "device", "network_def", "preprocessing", "inferer"):
        assert key in cfg, f"{name}: inference.json lacks {key!r}"
    assert cfg["bundle_root"] == f"$ctcovid.bundle.bundle_path('{name}')"
    text = json.dumps(cfg)
    assert "pretrained\": true" not in text.lower()


def test_bad_metadata_names_the_bundle(tmp_path):
    src = bundles_root() / PRESENT[0]
    dst = tmp_path / PRESENT[0]
    shutil.copytree(src / "configs", dst / "configs")
    meta = json.loads((dst / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]
    (dst / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=PRESENT[0]):
        verify_bundle_metadata(dst)


def test_bundle_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("CTCOVID_BUNDLE_DIR", str(tmp_path))
    assert bundle_path("ct_lung_segmentation") == str(tmp_path.resolve() / "ct_lung_segmentation")
