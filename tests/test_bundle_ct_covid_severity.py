"""Bundle ct_covid_severity_classification: severity CSV layout, short real training, inference with lung
masks, evaluation report, metadata and network checks.

Real data: the four MedSeg COVID volumes (display values 0-4095) with their lung masks. Their severity
labels are the MosMed-style grade *derived* from the infection masks in ``cases.csv`` (all CT-1 = mild):
a demonstration that the configs run, not a severity model. The COV19-CT-DB severity layout (a
``Name,Category`` CSV and per-scan JPG slice folders) is written here from those volumes.
Trainings use reduced sizes by config override (2 Inception-v3 members, 8 + 4 slices at 75x75).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_runs import evaluate, infer_with_checkpoint, short_training
from monai.bundle import ConfigParser

from ctcovid.bundle import bundle_path, verify_bundle_metadata
from ctcovid.networks import SeverityEnsemble
from ctcovid.training import DatalistError, severity_csv_datalist
from ctcovid.transforms import kept_slices_from_meta

BUNDLE = Path(bundle_path("ct_covid_severity_classification"))
CONFIGS = BUNDLE / "configs"
META = str(CONFIGS / "metadata.json")
CLASSES = ["mild", "moderate", "severe", "critical"]
# reduced sizes for the CPU test run; 75x75 is the smallest input the Inception backbones take
SMALL = {
    "backbones": ["inception_v3"],
    "repeats": 2,
    "depths": [8, 4],
    "spatial_size": [75, 75],
    "num_workers": 0,
}


def _grades(medseg_dir: Path) -> dict[str, int]:
    """COV19-CT-DB Category (1..4) per MedSeg case from the derived MosMed-style grade CT-1..CT-4."""
    with open(medseg_dir / "cases.csv", newline="") as f:
        return {
            r["case"]: int(r["derived_grade_mosmed_style"].removeprefix("CT-")) for r in csv.DictReader(f)
        }


def _write_jpg_scan(folder: Path, medseg_dir: Path, case: str, n: int = 10) -> None:
    """n evenly spaced slices of a MedSeg volume as 8-bit JPGs (a COV19-CT-DB scan folder)."""
    import nibabel as nib
    from PIL import Image

    vol = np.asarray(nib.load(medseg_dir / "images" / f"{case}.nii.gz").dataobj).astype(np.float32)
    folder.mkdir(parents=True)
    for i, k in enumerate(np.linspace(0, vol.shape[2] - 1, n).round().astype(int)):
        Image.fromarray((np.clip(vol[:, :, k].T / 4095, 0, 1) * 255).astype(np.uint8)).save(
            folder / f"{i}.jpg"
        )


@pytest.fixture(scope="module")
def severity_tree(tmp_path_factory, medseg_dir) -> Path:
    """COV19-CT-DB severity layout: <root>/{train,val}/ct_scan_<case>/ + Name,Category CSVs."""
    root = tmp_path_factory.mktemp("cov19_severity")
    grades = _grades(medseg_dir)
    for split, cases in (("train", ("rp2", "rp4")), ("val", ("rp6", "rp8"))):
        rows = ["Name,Category"]
        for case in cases:
            _write_jpg_scan(root / split / f"ct_scan_{case}", medseg_dir, case)
            rows.append(f"ct_scan_{case},{grades[case]}")
        (root / f"{split}_partition_covid_categories.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, severity_tree) -> dict:
    """One short real training on the severity CSV layout (1 epoch, 1 batch of 2 scans)."""
    return short_training(CONFIGS, tmp_path_factory.mktemp("sev_train"), severity_tree, SMALL)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_severity_csv_datalist(severity_tree, tmp_path):
    items = severity_csv_datalist(severity_tree / "train_partition_covid_categories.csv", severity_tree)
    assert [(i["name"], i["label"]) for i in items] == [("ct_scan_rp2", 0), ("ct_scan_rp4", 0)]  # CT-1 = mild
    assert items[0]["image"] == str(severity_tree / "train" / "ct_scan_rp2")  # found in a sub-folder
    (tmp_path / "semi.csv").write_text("Name;Category\nct_scan_rp6;4\n")  # ';' separated, critical
    assert severity_csv_datalist(tmp_path / "semi.csv", severity_tree)[0]["label"] == 3
    (tmp_path / "range.csv").write_text("Name,Category\nct_scan_rp6,5\n")
    with pytest.raises(DatalistError, match="outside 1..4"):
        severity_csv_datalist(tmp_path / "range.csv", severity_tree)
    (tmp_path / "missing.csv").write_text("Name,Category\nct_scan_999,2\n")
    with pytest.raises(DatalistError, match="'ct_scan_999' not found"):
        severity_csv_datalist(tmp_path / "missing.csv", severity_tree)
    (tmp_path / "cols.csv").write_text("scan,grade\nct_scan_rp6,2\n")
    with pytest.raises(DatalistError, match="'Name' and 'Category'"):
        severity_csv_datalist(tmp_path / "cols.csv", severity_tree)


def test_metadata_verifies_offline():
    verify_bundle_metadata(BUNDLE)
    meta = json.loads(Path(META).read_text())
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 48 and fmt["inputs"]["image"]["spatial_shape"] == [
        299,
        299,
    ]
    assert list(fmt["outputs"]["pred"]["channel_def"].values()) == CLASSES


def test_config_defaults_are_the_paper_setup():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    assert (
        parser["backbones"] == ["inception_v3", "inception_v4", "inception_resnet_v2"]
        and parser["repeats"] == 2
    )
    assert (
        parser["depths"] == [32, 16] and parser["spatial_size"] == [299, 299] and parser["mask_lung"] is True
    )
    assert (
        parser["learning_rate"] == 1e-4 and parser["lr_milestones"] == [15, 30] and parser["max_epochs"] == 40
    )
    assert parser["batch_size"] == 16 and parser["class_names"] == CLASSES


def test_verify_net_in_out_full_size_members():
    """Every paper backbone at the real input (48 x 299 x 299 -> 4 probabilities).

    The 6-member ensemble at 299x299 is too slow for the CPU suite, so each backbone is verified as a
    one-member ensemble (the same member class the 6-member ensemble stacks).
    """
    from monai.bundle import verify_net_in_out

    for backbone in ("inception_v3", "inception_v4", "inception_resnet_v2"):
        verify_net_in_out(
            net_id="network_def",
            meta_file=META,
            config_file=str(CONFIGS / "inference.json"),
            device="cpu",
            backbones=[backbone],
            repeats=1,
        )


@pytest.mark.slow
def test_train_writes_checkpoints(trained):
    best = torch.load(trained["ckpt_dir"] / "model.pt", map_location="cpu", weights_only=True)
    init = SeverityEnsemble(
        backbones=["inception_v3"], repeats=2, slices_a=8, slices_b=4, seed=0
    ).state_dict()
    assert best.keys() == init.keys()
    assert best["members.0.conv_a.weight"].shape == (3, 8, 3, 3) and best[
        "members.0.conv_b.weight"
    ].shape == (3, 4, 3, 3)
    assert not torch.equal(best["members.1.fuse.weight"], init["members.1.fuse.weight"])  # trained
    assert (trained["ckpt_dir"] / "checkpoint_epoch=1.pt").is_file()
    rows = _read_csv(trained["logs"] / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1"] and "val_macro_f1" in rows[0]


@pytest.mark.slow
def test_inference_with_lung_masks_uses_trained_weights(trained, tmp_path, medseg_dir, severity_tree):
    """A datalist with a lung mask for one scan: lung slices selected and masked there, all slices elsewhere."""
    datalist = tmp_path / "scans.json"
    datalist.write_text(
        json.dumps(
            [
                {
                    "image": str(medseg_dir / "images" / "rp6.nii.gz"),
                    "lung_mask": str(medseg_dir / "lung_masks" / "rp6.nii.gz"),
                },
                {"image": str(severity_tree / "val" / "ct_scan_rp8"), "name": "rp8_slices"},
            ]
        )
    )
    out = tmp_path / "out"
    wf = infer_with_checkpoint(CONFIGS, trained["ckpt_dir"] / "model.pt", out, **SMALL, datalist=str(datalist))
    saved = torch.load(trained["ckpt_dir"] / "model.pt", map_location="cpu", weights_only=True)

    rows = {r["name"]: r for r in _read_csv(out / "predictions.csv")}
    assert set(rows) == {"rp6", "rp8_slices"}
    for r in rows.values():
        p = [float(r[f"prob_{c}"]) for c in CLASSES]
        assert r["status"] == "ok" and sum(p) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted_class"] == CLASSES[int(np.argmax(p))]

    # what the preprocessing did with the mask: slices with >= 1 % lung kept, non-lung set to 0
    import nibabel as nib

    pre = wf.parser.get_parsed_content("preprocessing")
    item = json.loads(datalist.read_text())[0]
    masked = pre(dict(item))["image"]
    unmasked = pre({"image": item["image"]})["image"]
    assert masked.shape == unmasked.shape == (12, 75, 75)
    lung = np.asarray(nib.load(item["lung_mask"]).dataobj) > 0.5
    expected = np.flatnonzero(lung.sum(axis=(0, 1)) >= 0.01 * lung.shape[0] * lung.shape[1]).tolist()
    assert kept_slices_from_meta(masked.meta) == expected and len(expected) < lung.shape[2]
    assert float((masked == 0).float().mean()) > float((unmasked == 0).float().mean()) + 0.2
    # the CSV row is the trained ensemble's output on that input
    net = SeverityEnsemble(backbones=["inception_v3"], repeats=2, slices_a=8, slices_b=4).eval()
    net.load_state_dict(saved)
    with torch.no_grad():
        prob = net(masked[None].as_tensor())[0]
    assert torch.allclose(prob, torch.tensor([float(rows["rp6"][f"prob_{c}"]) for c in CLASSES]), atol=1e-5)


@pytest.mark.slow
def test_evaluate_report_with_absent_classes(trained, tmp_path):
    out = evaluate(CONFIGS, trained, tmp_path / "eval")
    text = (out / "classification_report.json").read_text()
    assert "NaN" not in text
    report = json.loads(text)
    assert report["class_names"] == CLASSES and report["num_samples"] == 2
    assert [s["name"] for s in report["scans"]] == ["ct_scan_rp6", "ct_scan_rp8"]
    assert report["per_class"]["mild"]["support"] == 2
    assert report["per_class"]["critical"]["support"] == 0 and report["per_class"]["critical"]["auc"] is None
    assert sum(report["confusion_matrix"][0]) == 2 and len(report["confusion_matrix"]) == 4
    assert report["accuracy"] == pytest.approx(report["confusion_matrix"][0][0] / 2)


@pytest.mark.slow
def test_ckpt_export_torchscript(trained, tmp_path):
    """TorchScript export of the trained ensemble with monai.bundle.ckpt_export.

    Traced, not scripted: the ensemble's ``forward(*args)`` and timm's backbones do not script. The traced
    module is the evaluation-mode network and must give the eager network's probabilities.
    """
    from monai.bundle import ckpt_export

    ts_file = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_file),
        ckpt_file=str(trained["ckpt_dir"] / "model.pt"),
        meta_file=META,
        config_file=str(CONFIGS / "inference.json"),
        use_trace=True,
        input_shape=[1, 12, 75, 75],
        converter_kwargs={"check_trace": False},  # checked below against the eager network instead
        **{k: v for k, v in SMALL.items() if k != "num_workers"},
    )
    traced = torch.jit.load(str(ts_file))
    net = SeverityEnsemble(backbones=["inception_v3"], repeats=2, slices_a=8, slices_b=4).eval()
    net.load_state_dict(torch.load(trained["ckpt_dir"] / "model.pt", map_location="cpu", weights_only=True))
    x = torch.rand(2, 12, 75, 75)
    with torch.no_grad():
        expected = net(x)
        assert torch.allclose(traced(x), expected, atol=1e-5)
    assert torch.allclose(expected.sum(dim=1), torch.ones(2), atol=1e-5)  # probabilities, not logits


def test_multi_gpu_override_is_a_ddp_wrapper():
    """The DDP override changes only what torchrun needs (checked on the merged config, no process group)."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    assert parser["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert parser["train"]["sampler"]["_target_"] == "DistributedSampler"
    assert (
        parser["train"]["dataloader"]["sampler"] == "@train#sampler"
        and parser["train"]["dataloader"]["shuffle"] is False
    )
    assert "get_rank() > 0" in parser["validate"]["evaluator"]["val_handlers"]
    assert parser["run"][-1] == "$@train#trainer.run()"
