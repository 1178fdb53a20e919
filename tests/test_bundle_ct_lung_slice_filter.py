"""ct_lung_slice_filter bundle: slice labels from real masks, a short real training whose checkpoint the
inference config loads (per-slice CSV), the evaluate config, and the offline bundle checks.

Its ResNeXt-50 weights (~90 MB) do not ship; inference without them must refuse, not guess.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from ctcovid.bundle import bundle_path, load_bundle_metadata, verify_bundle_metadata

BUNDLE = Path(bundle_path("ct_lung_slice_filter"))
CONFIGS = BUNDLE / "configs"


def _run(config_file, **override) -> None:
    from monai.bundle import run

    files = (
        [str(CONFIGS / c) for c in config_file]
        if isinstance(config_file, (list, tuple))
        else str(CONFIGS / config_file)
    )
    run(config_file=files, meta_file=str(CONFIGS / "metadata.json"), **override)


def test_metadata_verifies_and_no_weights_ship():
    verify_bundle_metadata(BUNDLE)
    meta = load_bundle_metadata(BUNDLE)
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [224, 224]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "non-lung", "1": "lung"}
    assert not (BUNDLE / "models" / "model.pt").exists()


def test_slice_labels_from_real_masks(medseg_dir, totalseg_dir):
    """rp6 (held out): lung slices are those whose mask covers >= 1 % of the slice; the lowest slices
    (abdomen) are non-lung. TotalSegmentator crop: lung only in its top slices."""
    from ctcovid.training import load_lung_datalist, lung_slice_items

    items = [
        it
        for it in load_lung_datalist(CONFIGS / "datalist.json", "test")
        if it["case"] in ("rp6", "totalseg_example_ct_sm")
    ]
    sl = lung_slice_items(items, spatial_size=(32, 32), min_area=0.01, with_mask=False)
    rp6 = [s for s in sl if s["case"] == "rp6"]
    assert len(rp6) == 42
    assert all(s["label"] == int(s["lung_fraction"] >= 0.01) for s in rp6)
    assert [s["label"] for s in rp6[:10]] == [0] * 10  # below the lungs
    assert sum(s["label"] for s in rp6) == sum(s["lung_fraction"] >= 0.01 for s in rp6) > 20
    ts = [s["label"] for s in sl if s["case"] == "totalseg_example_ct_sm"]
    assert len(ts) == 30 and ts[:19] == [0] * 19 and sum(ts) >= 8


def test_inference_refuses_missing_weights(totalseg_dir, tmp_path):
    from ctcovid.training.handlers import MissingWeightsError

    with pytest.raises(Exception) as info:
        _run(
            "inference.json", dataset_dir=str(totalseg_dir / "example_ct_sm.nii.gz"), output_dir=str(tmp_path)
        )
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(x, MissingWeightsError) and "ct_lung_slice_filter" in str(x) for x in chain)


@pytest.mark.slow
def test_short_training_then_inference_and_evaluate(totalseg_dir, tmp_path):
    """1 epoch x 2 iterations of the real ResNeXt-50 at 64x64 on real lung / non-lung slices; inference
    loads the checkpoint and writes one probability per slice; evaluate.json reports the metrics."""
    ckpt = tmp_path / "ckpt"
    small = {
        "ckpt_dir": str(ckpt),
        "output_dir": str(tmp_path / "log"),
        "spatial_size": [64, 64],
        "train_limit": 1,
        "val_limit": 1,
        "max_slices_per_item": 6,
        "batch_size": 4,
        "epoch_length": 2,
        "max_epochs": 1,
    }
    _run("train.json", **small)
    assert (ckpt / "model.pt").is_file() and (ckpt / "checkpoint_checkpoint_epoch=1.pt").is_file()
    state = torch.load(ckpt / "checkpoint_checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    assert state["trainer"]["iteration"] == 2 and state["trainer"]["epoch_length"] == 2  # = epoch 1

    scan = totalseg_dir / "example_ct_sm.nii.gz"
    _run(
        "inference.json",
        dataset_dir=str(scan),
        output_dir=str(tmp_path / "pred"),
        ckpt_path=str(ckpt / "model.pt"),
        spatial_size=[64, 64],
    )
    with open(tmp_path / "pred" / "example_ct_sm_slices.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["slice"]) for r in rows] == list(range(30))
    probs = [float(r["lung_probability"]) for r in rows]
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert [int(r["lung"]) for r in rows] == [int(p >= 0.5) for p in probs]

    _run(
        ["train.json", "evaluate.json"],
        ckpt_path=str(ckpt / "model.pt"),
        output_dir=str(tmp_path / "eval"),
        spatial_size=[64, 64],
        test_split="test",
        datalist=str(_small_test_datalist(tmp_path)),
    )
    with open(tmp_path / "eval" / "metrics.csv", newline="") as f:
        metrics = dict(csv.reader(f))
    assert {"val_accuracy", "val_sensitivity", "val_specificity", "val_balanced_accuracy"} <= set(metrics)
    assert 0.0 <= float(metrics["val_accuracy"]) <= 1.0


def _small_test_datalist(tmp_path: Path) -> Path:
    """The committed datalist with its test split cut to the TotalSegmentator crop (30 slices: both classes)."""
    d = json.loads((CONFIGS / "datalist.json").read_text())
    d["test"] = [it for it in d["test"] if it["case"] == "totalseg_example_ct_sm"]
    out = tmp_path / "datalist_small.json"
    out.write_text(json.dumps(d))
    return out
