"""Stage-1 adult extension (issue 18, item 3): the adult datalist keeps both stages' held-out patients out of
training, is what the builder makes from the committed datalists, and the fine-tune config starts from the
shipped weights and trains on children plus repeated adults."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_path
from monai.bundle import ConfigWorkflow
from PIL import Image

from ctcovid.bundle import bundles_root
from ctcovid.bundle.loading import read_state_dict
from ctcovid.cxr import STAGE1_BUNDLE, STAGE2_BUNDLE
from ctcovid.cxr.adult_datalist import (
    ADULT_PARTS,
    adult_stage1_items,
    load_adult_training,
    make_adult_datalist,
)

ADULT_DL = bundles_root() / STAGE1_BUNDLE / "configs" / "datalist_adult.json"


def _item(image, label, patient):
    return {"image": image, "label": label, "patient": patient}


def test_adult_films_follow_stage2_parts_and_non_viral_split_by_patient():
    kermany = {p: [_item(f"train/{p}.jpeg", 0, f"k-{p}")] for p in ADULT_PARTS}
    stage2 = {
        "training": [_item("a.jpg", 0, "1")],
        "validation": [_item("b.jpg", 1, "2")],
        "test": [_item("c.jpg", 0, "3")],
    }
    adults = [
        _item("images/a.jpg", 2, "1"),
        _item("images/a_normal.jpg", 0, "1"),  # patient 1: stage-2 training
        _item("images/b.jpg", 2, "2"),  # stage-2 validation
        _item("images/c.jpg", 2, "3"),
        _item("images/c_bact.jpg", 1, "3"),  # stage-2 test: held out whole
        _item("images/new_viral.jpg", 2, "9"),  # viral, unknown to stage 2: held out
        *[_item(f"images/bact{i}.jpg", 1, f"b{i}") for i in range(10)],
    ]
    dl = make_adult_datalist(kermany, stage2, adults)
    where = {it["image"]: part for part in ADULT_PARTS for it in dl[part]}
    assert where["ieee8023/images/a.jpg"] == where["ieee8023/images/a_normal.jpg"] == "training"
    assert where["ieee8023/images/b.jpg"] == "validation"
    assert where["ieee8023/images/c.jpg"] == where["ieee8023/images/c_bact.jpg"] == "test"
    assert where["ieee8023/images/new_viral.jpg"] == "test"
    bact = Counter(where[f"ieee8023/images/bact{i}.jpg"] for i in range(10))
    assert bact == {"training": 6, "test": 4}
    for p in ADULT_PARTS:  # children keep their part, prefixed with their folder
        assert where[f"kermany/train/{p}.jpeg"] == p
    assert dl["counts"]["test"]["adult"] == {"normal": 0, "bacterial": 5, "viral": 2}


def test_load_adult_training_subsamples_children_and_repeats_adults(tmp_path):
    items = [{**_item(f"kermany/{i}.jpeg", i % 3, f"k{i}"), "domain": "child"} for i in range(30)]
    items += [
        {**_item(f"ieee8023/{c}{i}.jpg", c, f"a{c}{i}"), "domain": "adult"}
        for c in range(3)
        for i in range(2)
    ]
    f = tmp_path / "dl.json"
    f.write_text(json.dumps({"training": items}))
    out = load_adult_training(f, tmp_path, child_limit=9, adult_repeat=(3, 2, 1))
    child = [it for it in out if it["domain"] == "child"]
    adult = Counter(it["name"] for it in out if it["domain"] == "adult")
    assert len(child) == 9 and Counter(it["label"] for it in child) == {0: 3, 1: 3, 2: 3}
    assert adult == {
        **{f"ieee8023/0{i}.jpg": 3 for i in range(2)},
        **{f"ieee8023/1{i}.jpg": 2 for i in range(2)},
        **{f"ieee8023/2{i}.jpg": 1 for i in range(2)},
    }
    assert all(Path(it["image"]).is_absolute() for it in out)


def test_committed_adult_datalist_is_rebuilt_and_keeps_cascade_test_patients_out():
    cxr = data_path("cxr")
    dl = json.loads(ADULT_DL.read_text())
    s1 = json.loads((bundles_root() / STAGE1_BUNDLE / "configs" / "datalist.json").read_text())
    s2 = json.loads((bundles_root() / STAGE2_BUNDLE / "configs" / "datalist.json").read_text())
    rebuilt = make_adult_datalist(s1, s2, adult_stage1_items(cxr / "ieee8023"))
    assert all(rebuilt[p] == dl[p] for p in ADULT_PARTS)
    patients = {p: {it["patient"] for it in dl[p]} for p in ADULT_PARTS}
    for i, a in enumerate(ADULT_PARTS):
        for b in ADULT_PARTS[i + 1 :]:
            assert not patients[a] & patients[b], (a, b)
    s2_test = {it["patient"] for it in s2["test"]}
    assert s2_test <= patients["test"]
    assert all((cxr / it["image"]).is_file() for p in ADULT_PARTS for it in dl[p])
    adult_train = Counter(it["label"] for it in dl["training"] if it["domain"] == "adult")
    assert min(adult_train[c] for c in range(3)) > 0  # adults of every class train


@pytest.mark.slow
def test_fine_tune_config_starts_from_the_shipped_weights(tmp_path):
    data_path("cxr", "ieee8023")
    src = bundles_root() / STAGE1_BUNDLE
    if not (src / "models" / "model.pt").is_file():
        pytest.skip("stage-1 weights not present")
    bdir = tmp_path / STAGE1_BUNDLE
    shutil.copytree(src / "configs", bdir / "configs")
    files = [str(bdir / "configs" / c) for c in ("train.json", "train_adult.json")]
    wf = ConfigWorkflow(
        config_file=files,
        workflow_type=None,
        bundle_root=str(bdir),
        logging_file=False,
        ckpt_dir=str(tmp_path / "ckpt"),
        init_weights=str(src / "models" / "model.pt"),
        epochs=1,
        child_limit=3,
        adult_repeat=[1, 0, 0],
        val_limit=3,
        batch_size=5,
        spatial_size=[64, 64],
    )
    wf.initialize()
    shipped = read_state_dict(src / "models" / "model.pt")
    net = wf.parser.get_parsed_content("network")
    # the network holds the shipped weights before the first step (fp16 storage, upcast)
    key = "conv1.weight" if "conv1.weight" in shipped else next(iter(shipped))
    assert torch.equal(net.state_dict()[key].float(), shipped[key])
    info = json.loads((tmp_path / "ckpt" / "fine_tune_info.json").read_text())
    assert info["fine_tuned_from_sha256"] and info["training_adult_images_per_epoch"]["normal"] > 0
    wf.run()
    wf.finalize()
    assert (tmp_path / "ckpt" / "model.pt").is_file()
    trained = read_state_dict(tmp_path / "ckpt" / "model.pt")
    assert not all(torch.equal(trained[k], shipped[k]) for k in shipped if shipped[k].is_floating_point())


def test_adult_lung_masks_cli_writes_masks_where_adult_training_reads_them(tmp_path, capsys):
    """``ctcovid cxr lung-masks --stage adult`` segments children and adult films of the adult datalist with the
    shipped X-ray lung segmenter, and ``load_adult_training(lung_masks=True)`` finds each mask (regional learning
    on children plus adults)."""
    from ctcovid.cli.main import main
    from ctcovid.cxr.masks import LUNG_SEGMENTATION_BUNDLE

    cxr = data_path("cxr")
    seg = bundles_root() / LUNG_SEGMENTATION_BUNDLE
    if not (seg / "models" / "model.pt").is_file():
        pytest.skip(f"no trained X-ray lung segmenter weights in {seg / 'models'}")
    bundles = tmp_path / "bundles"
    shutil.copytree(seg, bundles / LUNG_SEGMENTATION_BUNDLE)
    (bundles / STAGE1_BUNDLE / "configs").mkdir(parents=True)
    training = json.loads(ADULT_DL.read_text())["training"]
    picked = [next(it for it in training if it["domain"] == d and it["label"] == c) for d, c in
              (("child", 0), ("child", 1), ("child", 2), ("adult", 2))]
    dl_file = bundles / STAGE1_BUNDLE / "configs" / "datalist_adult.json"
    dl_file.write_text(json.dumps({"training": picked}))
    masks = tmp_path / "masks"
    argv = ["cxr", "lung-masks", "--stage", "adult", "--mask-root", str(masks), "--bundle-dir", str(bundles),
            "--data-root", str(cxr)]
    assert main(argv) == 0
    assert "4 masks written" in capsys.readouterr().out and (masks / "kermany").is_dir()

    with pytest.raises(FileNotFoundError, match="no manual lung mask"):  # Kermany films have no manual mask
        load_adult_training(dl_file, cxr, lung_masks=True)
    out = load_adult_training(dl_file, cxr, adult_repeat=(1, 1, 2), lung_masks=True, mask_root=masks)
    assert len(out) == 5  # the adult viral film twice
    for it in out:
        assert it["lung_mask"] == str((masks / it["name"]).with_suffix(".png"))
        with Image.open(it["lung_mask"]) as m:
            lung = np.asarray(m) > 127
        with Image.open(it["image"]) as im:
            assert lung.shape == im.size[::-1]
        # a trained segmenter on a frontal film: two lung fields, a plausible share of the film
        assert 0.10 < lung.mean() < 0.60, (it["name"], lung.mean())


def test_regional_config_adds_masks_to_the_adult_training_items(tmp_path):
    """train.json + train_adult.json + train_regional.json: regional learning on children plus repeated adults;
    every training item (children and adults) carries its lung mask under ``mask_root``."""
    from monai.bundle import ConfigParser

    cxr = data_path("cxr")
    configs = bundles_root() / STAGE1_BUNDLE / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / f) for f in ("train.json", "train_adult.json", "train_regional.json")])
    parser.update({"bundle_root": str(configs.parent), "data_root": str(cxr), "mask_root": str(tmp_path),
                   "child_limit": 30, "ckpt_dir": str(tmp_path / "ckpt")})
    items = parser.get_parsed_content("train#datalist")
    domains = Counter(it["domain"] for it in items)
    assert domains["child"] == 30 and domains["adult"] > 100
    assert all(it["lung_mask"] == str((tmp_path / it["name"]).with_suffix(".png")) for it in items)
    assert parser.get_parsed_content("network_def#moex") is False
