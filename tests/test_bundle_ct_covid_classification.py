"""Bundle ct_covid_classification: datalists, short real training, inference, evaluation, resume/DDP.

Real data: MedSeg COVID volumes (display values, lung masks), slices of the COVID-CT-MD normal002 DICOM
series (non-COVID), the TotalSegmentator example DICOM series, and a COV19-CT-DB-style tree of JPG slice
folders written here from those volumes. Trainings use reduced sizes by config override (2 members, 8
slices at 64x64, one epoch); the full-size network is checked by verify_net_in_out. The TorchScript
export is tested on the severity bundle (same ensemble class, cheaper to trace).
"""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_runs import evaluate, infer_with_checkpoint, short_training
from monai.bundle import ConfigParser, ConfigWorkflow

from ctcovid.bundle import bundle_path, verify_bundle_metadata
from ctcovid.io.errors import CorruptFileError, EmptyInputError
from ctcovid.metrics import classification_report
from ctcovid.networks import DetectionEnsemble
from ctcovid.training import (
    FAILED_KEY,
    SKIPPED_KEY,
    DatalistError,
    ScanDataset,
    collate_skip_failed,
    cov19ctdb_datalist,
    find_scans,
    load_datalist,
)
from ctcovid.training.handlers import MissingWeightsError, latest_checkpoint

BUNDLE = Path(bundle_path("ct_covid_classification"))
CONFIGS = BUNDLE / "configs"
META = str(CONFIGS / "metadata.json")
# reduced sizes for the CPU test run (the architecture stays DenseNet-161 members)
SMALL = {"num_members": 2, "depth": 8, "spatial_size": [64, 64], "num_workers": 0}


# ---------------------------------------------------------------------------------------------------------
# real-data fixtures
# ---------------------------------------------------------------------------------------------------------


def _to_uint8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((a.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


def _write_slices(folder: Path, slices: list[np.ndarray]) -> Path:
    """Write 2D uint8 slices as 0.jpg, 1.jpg, ... (the COV19-CT-DB scan-folder format)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(slices):
        Image.fromarray(s).save(folder / f"{i}.jpg", quality=95)
    return folder


def _medseg_slices(medseg_dir: Path, case: str, n: int = 8) -> list[np.ndarray]:
    """n lung slices of a MedSeg volume (0-4095 display values) as 8-bit axial images."""
    import nibabel as nib

    vol = np.asarray(nib.load(medseg_dir / "images" / f"{case}.nii.gz").dataobj)
    lung = np.asarray(nib.load(medseg_dir / "lung_masks" / f"{case}.nii.gz").dataobj)
    with_lung = np.flatnonzero(lung.sum(axis=(0, 1)) > 0)
    idx = with_lung[np.linspace(0, len(with_lung) - 1, n).round().astype(int)]
    return [_to_uint8(vol[:, :, k].T, 0, 4095) for k in idx]


def _dicom_slices(series_dir: Path, start: int, n: int = 8, step: int = 6) -> list[np.ndarray]:
    """n slices (sorted by position) of a HU DICOM series, lung-windowed to 8 bit like exported JPGs."""
    import pydicom

    files = []
    for f in series_dir.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        files.append((float(ds.ImagePositionPatient[2]), f))
    files.sort()
    out = []
    for _, f in files[start : start + n * step : step]:
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        out.append(_to_uint8(hu, -1350, 150))
    return out


@pytest.fixture(scope="module")
def cov19_tree(tmp_path_factory, medseg_dir, covid_ct_md_series) -> Path:
    """COV19-CT-DB detection layout from real slices: train/val x covid/non-covid, one scan each."""
    root = tmp_path_factory.mktemp("cov19ctdb")
    _write_slices(root / "train" / "covid" / "ct_scan_0", _medseg_slices(medseg_dir, "rp2"))
    _write_slices(root / "train" / "non-covid" / "ct_scan_1", _dicom_slices(covid_ct_md_series, 30))
    _write_slices(root / "val" / "covid" / "ct_scan_0", _medseg_slices(medseg_dir, "rp4"))
    _write_slices(root / "val" / "non-covid" / "ct_scan_1", _dicom_slices(covid_ct_md_series, 33))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cov19_tree) -> dict:
    """One short real training of train.json on the COV19-CT-DB tree (1 epoch, 1 iteration of 2 scans)."""
    return short_training(CONFIGS, tmp_path_factory.mktemp("det_train"), cov19_tree, SMALL)


def _in_chain(exc: BaseException, cls: type) -> BaseException:
    """The exception of type ``cls`` in ``exc``'s cause chain (MONAI wraps config-expression errors)."""
    e: BaseException | None = exc
    while e is not None and not isinstance(e, cls):
        e = e.__cause__ or e.__context__
    assert e is not None, f"no {cls.__name__} in the chain of {exc!r}"
    return e


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------
# datalists and the bad-scan policy (fast)
# ---------------------------------------------------------------------------------------------------------


def test_find_scans_one_entry_per_scan(tmp_path, medseg_dir, totalseg_dir):
    root = tmp_path / "scans"
    (root / "nested").mkdir(parents=True)
    os.symlink(medseg_dir / "images" / "rp2.nii.gz", root / "rp2.nii.gz")
    os.symlink(totalseg_dir / "example_ct_dicom", root / "nested" / "ts_dicom")  # DICOM files without suffix
    _write_slices(root / "slices_scan", [np.zeros((8, 8), np.uint8)] * 2)
    (root / ".hidden").mkdir()
    (root / "notes.txt").write_text("not a scan")
    scans = find_scans(root)
    assert [s["name"] for s in scans] == ["nested/ts_dicom", "rp2", "slices_scan"]
    assert all(Path(s["image"]).exists() for s in scans)
    # a scan folder given directly is one scan
    assert find_scans(root / "slices_scan") == [
        {"image": str((root / "slices_scan").resolve()), "name": "slices_scan"}
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyInputError, match="no scans found"):
        find_scans(tmp_path / "empty")


def test_cov19ctdb_layout_labels(cov19_tree):
    items = cov19ctdb_datalist(cov19_tree, "train")
    assert [(i["name"], i["label"]) for i in items] == [
        ("train/non-covid/ct_scan_1", 0),
        ("train/covid/ct_scan_0", 1),
    ]
    with pytest.raises(DatalistError, match="split folder 'test'"):
        cov19ctdb_datalist(cov19_tree, "test")


def test_load_datalist_csv_and_json(tmp_path, medseg_dir):
    img, mask = medseg_dir / "images" / "rp2.nii.gz", medseg_dir / "lung_masks" / "rp2.nii.gz"
    (tmp_path / "scan.nii.gz").symlink_to(img)
    (tmp_path / "list.csv").write_text(f"image,label,lung_mask\nscan.nii.gz,covid,{mask}\nscan.nii.gz,0,\n")
    items = load_datalist(tmp_path / "list.csv", class_names=["non-covid", "covid"])
    assert items[0] == {
        "image": str(tmp_path / "scan.nii.gz"),
        "label": 1,
        "lung_mask": str(mask),
        "name": "scan",
    }
    assert items[1]["label"] == 0 and "lung_mask" not in items[1]  # empty mask cell dropped
    (tmp_path / "list.json").write_text(json.dumps({"testing": [{"image": "scan.nii.gz", "label": 1}]}))
    assert load_datalist(tmp_path / "list.json", key="testing")[0]["label"] == 1
    with pytest.raises(DatalistError, match="choose the list with key"):
        load_datalist(tmp_path / "list.json")
    (tmp_path / "bad.csv").write_text("image,label\nscan.nii.gz,pneumonia\n")
    with pytest.raises(DatalistError, match="'pneumonia' is not one of"):
        load_datalist(tmp_path / "bad.csv", class_names=["non-covid", "covid"])
    (tmp_path / "missing.csv").write_text("image,label\nnope.nii.gz,1\n")
    with pytest.raises(DatalistError, match="does not exist"):
        load_datalist(tmp_path / "missing.csv")


def test_scan_dataset_skip_records_and_raise(tmp_path):
    """The bad-scan policy: inference skips and records, training names the file and stops."""
    from ctcovid.io import LoadCTd

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x00" * 400)
    good = _write_slices(tmp_path / "scan", [np.full((16, 16), v, np.uint8) for v in (10, 200)])
    data = [{"image": str(bad), "name": "broken"}, {"image": str(good), "name": "scan"}]
    skipping = ScanDataset(data, LoadCTd("image"), on_error="skip")
    rec = skipping[0]
    assert rec[FAILED_KEY] and rec["error_type"] == "CorruptFileError" and str(bad) in rec["error"]
    batch = collate_skip_failed([skipping[0], skipping[1]])
    assert batch["image"].shape == (1, 1, 16, 16, 2)
    assert batch[SKIPPED_KEY][0]["name"] == "broken"
    assert "image" not in collate_skip_failed([rec])  # an all-bad batch has no tensors
    with pytest.raises(CorruptFileError, match="broken.nii.gz"):
        ScanDataset(data, LoadCTd("image"), on_error="raise")[0]


def test_metadata_verifies_offline():
    verify_bundle_metadata(BUNDLE)


# ---------------------------------------------------------------------------------------------------------
# networks at full size
# ---------------------------------------------------------------------------------------------------------


def test_verify_net_in_out_full_size():
    """The paper-size ensemble (3 x DenseNet-161, 64x224x224) maps one image to 2 probabilities."""
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def", meta_file=META, config_file=str(CONFIGS / "inference.json"), device="cpu"
    )


# ---------------------------------------------------------------------------------------------------------
# training -> inference -> evaluation -> export (slow: one real training)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_writes_best_and_latest_checkpoints(trained):
    ckpt_dir = trained["ckpt_dir"]
    best = torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True)
    latest = torch.load(latest_checkpoint(ckpt_dir), map_location="cpu", weights_only=True)
    assert Path(latest_checkpoint(ckpt_dir)).name.endswith("epoch=1.pt")
    assert set(latest) >= {"model", "optimizer", "lr_scheduler", "trainer"}
    assert (
        latest["trainer"]["iteration"] == 1 and latest["trainer"]["epoch_length"] == 1
    )  # 1 epoch of 1 batch
    # the saved network is the config's network (2 members of 8 slices) and training changed it
    init = DetectionEnsemble(num_members=2, in_slices=8, seed=0).state_dict()
    assert best.keys() == init.keys()
    key = "members.0.input_block.weight"
    assert best[key].shape == (3, 8, 3, 3)
    assert not torch.equal(best[key], init[key])
    rows = _read_csv(trained["logs"] / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1"]
    assert 0.0 <= float(rows[0]["val_macro_f1"]) <= 1.0 and float(rows[0]["lr"]) == pytest.approx(1e-4)
    assert any(f.name.startswith("events.out.tfevents") for f in trained["logs"].iterdir())


@pytest.mark.slow
def test_inference_loads_trained_weights_and_records_bad_scans(
    trained, tmp_path, medseg_dir, totalseg_dir, cov19_tree
):
    scans = tmp_path / "scans"
    scans.mkdir()
    os.symlink(medseg_dir / "images" / "rp6.nii.gz", scans / "rp6.nii.gz")
    os.symlink(totalseg_dir / "example_ct_dicom", scans / "ts_dicom")  # HU DICOM series, files without suffix
    os.symlink(cov19_tree / "val" / "covid" / "ct_scan_0", scans / "jpg_scan")
    (scans / "truncated.nii.gz").write_bytes(b"\x1f\x8b\x08" + b"\x00" * 200)  # gzip magic, no content
    out = tmp_path / "out"
    # the network that runs carries exactly the saved weights (asserted by infer_with_checkpoint)
    wf = infer_with_checkpoint(CONFIGS, trained["ckpt_dir"] / "model.pt", out, **SMALL, dataset_dir=str(scans))
    saved = torch.load(trained["ckpt_dir"] / "model.pt", map_location="cpu", weights_only=True)

    rows = {r["name"]: r for r in _read_csv(out / "predictions.csv")}
    assert set(rows) == {"jpg_scan", "ts_dicom", "rp6", "truncated"}
    assert rows["truncated"]["status"] == "skipped" and "truncated.nii.gz" in rows["truncated"]["error"]
    for name in ("jpg_scan", "ts_dicom", "rp6"):
        r = rows[name]
        assert r["status"] == "ok" and r["error"] == ""
        p = [float(r["prob_non-covid"]), float(r["prob_covid"])]
        assert sum(p) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted_class"] == ["non-covid", "covid"][int(np.argmax(p))]

    # the CSV holds what the trained network gives on the config's preprocessing (one scan re-computed)
    item = wf.parser.get_parsed_content("preprocessing")(
        {"image": str(scans / "jpg_scan"), "name": "jpg_scan"}
    )
    assert item["image"].shape == (8, 64, 64)
    net = DetectionEnsemble(num_members=2, in_slices=8).eval()
    with torch.no_grad():
        random_prob = net(item["image"][None].as_tensor())[0]
        net.load_state_dict(saved)
        trained_prob = net(item["image"][None].as_tensor())[0]
    csv_prob = torch.tensor(
        [float(rows["jpg_scan"]["prob_non-covid"]), float(rows["jpg_scan"]["prob_covid"])]
    )
    assert torch.allclose(csv_prob, trained_prob, atol=1e-5)
    assert not torch.allclose(csv_prob, random_prob, atol=1e-5)


@pytest.mark.slow
def test_evaluate_writes_classification_report(trained, tmp_path):
    out = evaluate(CONFIGS, trained, tmp_path / "eval")
    report = json.loads((out / "classification_report.json").read_text())
    assert report["num_samples"] == 2 and report["class_names"] == ["non-covid", "covid"]
    assert sum(map(sum, report["confusion_matrix"])) == 2
    assert report["checkpoint"] == str(trained["ckpt_dir"] / "model.pt")
    # the summary numbers are those of the listed per-scan probabilities
    labels = [report["class_names"].index(s["label"]) for s in report["scans"]]
    again = classification_report(
        labels, [s["probabilities"] for s in report["scans"]], report["class_names"]
    )
    assert again["macro_f1"] == pytest.approx(report["macro_f1"])
    assert again["per_class"]["covid"]["auc"] == pytest.approx(report["per_class"]["covid"]["auc"])
    assert sorted(labels) == [0, 1]


@pytest.mark.slow
def test_resume_with_multi_gpu_config(trained, tmp_path, monkeypatch):
    """multi_gpu_train.json (DDP, here gloo on CPU with one process) resumes from the latest checkpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        monkeypatch.setenv(k, v)
    work = tmp_path / "resumed"
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")],
        workflow_type="train",
        **dict(
            trained["overrides"],
            ckpt_dir=str(work / "models"),
            output_dir=str(work / "logs"),
            max_epochs=2,
            resume=True,
        ),
        **{"train#resume_loader#load_path": latest_checkpoint(trained["ckpt_dir"])},
    )
    wf.initialize()
    try:
        wf.run()
        assert isinstance(wf.parser.get_parsed_content("network"), torch.nn.parallel.DistributedDataParallel)
    finally:
        wf.finalize()
    import ignite.distributed as idist

    assert not torch.distributed.is_initialized() and idist.model_name() == "serial"  # nothing leaks out
    ckpt = torch.load(latest_checkpoint(work / "models"), map_location="cpu", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 2  # one more epoch (of 1 batch) after the restored one, not two
    assert ckpt["lr_scheduler"]["last_epoch"] == 2
    assert [r["epoch"] for r in _read_csv(work / "logs" / "metrics.csv")] == ["2"]
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped, loadable by inference


def test_missing_weights_fail_clearly_unless_allowed(tmp_path, cov19_tree):
    scan = cov19_tree / "val" / "covid" / "ct_scan_0"
    kw = dict(
        SMALL,
        num_members=1,
        dataset_dir=str(scan),
        ckpt_path=str(tmp_path / "none.pt"),
        output_dir=str(tmp_path),
    )
    wf = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), workflow_type="infer", **kw)
    wf.initialize()
    with pytest.raises(Exception) as info:  # MONAI wraps errors raised in config expressions in RuntimeError
        wf.run()
    err = _in_chain(info.value, MissingWeightsError)
    assert "'ct_covid_classification' has no trained weights" in str(err) and "train.json" in str(err)
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), workflow_type="infer", allow_random_weights=True, **kw
    )
    wf.initialize()
    wf.run()
    rows = _read_csv(tmp_path / "predictions.csv")
    assert [r["status"] for r in rows] == ["ok"]


def test_config_defaults_are_the_paper_schedule():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    assert parser["num_members"] == 3 and parser["backbone"] == "densenet161"
    assert parser["depth"] == 64 and parser["spatial_size"] == [224, 224]
    assert (
        parser["learning_rate"] == 1e-4 and parser["lr_milestones"] == [15, 30] and parser["lr_gamma"] == 0.1
    )
    assert parser["max_epochs"] == 40 and parser["batch_size"] == 16
    assert parser["loss_type"] in parser["losses"] and set(parser["losses"]) == {"cross_entropy", "focal"}


@pytest.mark.parametrize("loss_type", ["cross_entropy", "focal"])
def test_loss_switch_with_class_weights(loss_type):
    """train.json's loss: every member's loss against class-index labels, averaged; class weights applied."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"loss_type": loss_type, "class_weights": [1.0, 3.0], "device": "$torch.device('cpu')"})
    loss = parser.get_parsed_content("loss")
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 2)  # (B, members, classes), the ensemble's training output
    labels = torch.tensor([0, 1, 1, 0])
    w = torch.tensor([1.0, 3.0])
    per_member = []
    for m in range(3):
        logp = torch.log_softmax(logits[:, m], dim=1).gather(1, labels[:, None])[:, 0]
        if loss_type == "cross_entropy":  # weighted mean, as torch defines it
            per_member.append(-(w[labels] * logp).sum() / w[labels].sum())
        else:  # softmax focal loss, gamma 2, mean over the (B, C) one-hot elements (MONAI's reduction)
            per_member.append(-(w[labels] * (1 - logp.exp()) ** 2 * logp).sum() / logits[:, m].numel())
    assert loss(logits, labels).item() == pytest.approx(torch.stack(per_member).mean().item(), rel=1e-5)


@pytest.mark.parametrize("mask_lung", [False, True])
def test_lung_mask_chain_switch(mask_lung):
    """With a listed lung mask the lung slices are selected; the detection input is masked only on request."""
    from ctcovid.transforms import ApplyIfKeyPresentd, LungSlicesFromMaskd, MaskToLungd, SelectLungSlicesd

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["mask_lung"] = mask_lung
    chain = [
        t for t in parser.get_parsed_content("preprocessing").transforms if isinstance(t, ApplyIfKeyPresentd)
    ]
    assert len(chain) == 1 and chain[0].key == "lung_mask"
    kinds = [type(t) for t in chain[0].chain.transforms]
    assert kinds == [LungSlicesFromMaskd, SelectLungSlicesd] + ([MaskToLungd] if mask_lung else [])
