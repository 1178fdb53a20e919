"""Stage 1 on films cropped to the lungs' bounding box (issue 18: the marker shortcut): the crop transform, the
training config that uses it, and the cascade that crops the same way at inference and draws Grad-CAM inside the
box on the whole film."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_path
from monai.data import MetaTensor
from PIL import Image
from test_cxr_pipeline import FixedStage2, MeanIntensityStage1, copy_bundles_with_random_weights

from ctcovid.bundle import bundles_root
from ctcovid.cxr import STAGE1_BUNDLE, CXRCascade, CXRStage
from ctcovid.cxr.masks import LUNG_SEGMENTATION_BUNDLE, SegmentLungsd
from ctcovid.transforms import LungBoxCrop, LungBoxCropd
from ctcovid.visualize.gradcam import paste_heatmap


def _mask(shape=(100, 80), rows=(20, 60), cols=(10, 50)) -> torch.Tensor:
    m = torch.zeros(1, *shape)
    m[0, rows[0]:rows[1], cols[0]:cols[1]] = 1
    return m


def test_box_is_the_mask_extent_widened_by_a_fraction_of_the_image_and_clipped():
    crop = LungBoxCrop(margin=0.05)
    assert crop.box(_mask()) == (15, 65, 6, 54)  # 5 rows (5 % of 100), 4 columns (5 % of 80)
    assert crop.box(_mask(rows=(2, 98), cols=(1, 79))) == (0, 100, 0, 80)  # clipped at the edges
    assert LungBoxCrop(margin=0.0).box(_mask()) == (20, 60, 10, 50)


def test_empty_or_speck_mask_keeps_the_whole_film():
    crop = LungBoxCrop(margin=0.05, min_area=0.05)
    assert crop.box(torch.zeros(1, 100, 80)) == (0, 100, 0, 80)
    assert crop.box(_mask(rows=(40, 45), cols=(30, 35))) == (0, 100, 0, 80)  # 25 px of 8000: a failed mask


def test_crop_values_and_bad_arguments():
    image = torch.arange(8000, dtype=torch.float32).reshape(1, 100, 80)
    out = LungBoxCrop(margin=0.0)(image, _mask())
    assert torch.equal(torch.as_tensor(out), image[:, 20:60, 10:50])
    with pytest.raises(ValueError, match="do not match"):
        LungBoxCrop()(image, torch.ones(1, 50, 50))
    with pytest.raises(ValueError, match="margin"):
        LungBoxCrop(margin=0.6)


def test_dictionary_twin_crops_keys_records_the_box_and_moves_the_affine():
    image = MetaTensor(torch.rand(1, 100, 80))
    d = LungBoxCropd(["image", "lung_mask"], margin=0.0)({"image": image, "lung_mask": _mask()})
    assert d["image"].shape == (1, 40, 40) and d["lung_mask"].shape == (1, 40, 40)
    assert torch.equal(torch.as_tensor(d["image"]), image[:, 20:60, 10:50].as_tensor())
    assert bool(d["lung_mask"].all())
    assert d["lung_box"] == {"box": [20, 60, 10, 50], "size": [100, 80]}
    assert d["image"].affine[:2, -1].tolist() == [20.0, 10.0]  # the crop's origin in the film's pixel grid
    with pytest.raises(ValueError, match="differ in size"):
        LungBoxCropd("image")({"image": torch.rand(1, 10, 10), "lung_mask": _mask()})


def test_paste_heatmap_puts_the_map_inside_the_scaled_box():
    out = paste_heatmap(np.ones((7, 7)), (20, 60, 10, 50), (100, 80), out_size=(50, 40))
    assert out.shape == (50, 40)
    assert out[10:30, 5:25].min() == 1.0 and out.sum() == 20 * 20


def _film_bright_in_box(tmp_path) -> str:
    """A 100x80 film, black except a white 40x40 block (rows 20-60, columns 10-50): mean 0.2 whole, 1 cropped."""
    a = np.zeros((100, 80), dtype=np.uint8)
    a[20:60, 10:50] = 255
    path = tmp_path / "film.png"
    Image.fromarray(a).save(path)
    return str(path)


def _stage1(segmenter=None, margin: float = 0.0) -> CXRStage:
    """The stub stage 1, optionally with the lung-box preprocessing of ``inference_lungbox.json``."""
    from monai.transforms import Compose, DeleteItemsd, EnsureTyped, RepeatChanneld, Resized

    steps = [Resized("image", (32, 32), mode="bilinear", anti_aliasing=True), RepeatChanneld("image", 3),
             EnsureTyped("image", dtype=torch.float32)]
    if segmenter is not None:
        steps = [SegmentLungsd("image", segmenter=segmenter), LungBoxCropd("image", margin=margin),
                 DeleteItemsd("lung_mask"), *steps]
    return CXRStage(MeanIntensityStage1(), ["normal", "bacterial", "viral"], transform=Compose(steps), name="stage 1")


def test_cascade_feeds_stage1_the_lung_box_and_draws_its_gradcam_inside(tmp_path):
    """The stub stage 1's viral probability is its input's mean: whole film 0.2, lung box 1.0; the threshold
    0.5 routes the film to stage 2 only if stage 1 saw the crop."""
    s2 = CXRStage(FixedStage2(), ["COVID-19", "viral-other"], spatial_size=(32, 32), name="stage 2")
    path = _film_bright_in_box(tmp_path)
    calls = []

    def segmenter(image):
        calls.append(tuple(image.shape))
        return _mask((100, 80)).to(torch.uint8)

    whole = CXRCascade(_stage1(), s2, 0.5).predict(path)
    assert whole.viral_probability == pytest.approx(0.2, abs=0.02) and not whole.passed_threshold
    assert whole.stage1_lung_box is None
    boxed = CXRCascade(_stage1(segmenter), s2, 0.5).predict(path)
    assert calls == [(1, 100, 80)] and boxed.stage1_lung_box == [20, 60, 10, 50]
    assert boxed.viral_probability > 0.99 and boxed.label == "COVID-19"

    # decided by stage 1 (threshold above any probability): its Grad-CAM is zero outside the box, so the
    # overlay outside the box is one flat colour (the colour map's 0 over black film)
    res = CXRCascade(_stage1(segmenter), s2, 1.0).predict(path, overlay_path=tmp_path / "o.png")
    assert res.decided_by == "stage 1"
    rgb = np.asarray(Image.open(res.overlay_png).convert("RGB")).astype(int)
    outside = np.ones((100, 80), dtype=bool)
    outside[20:60, 10:50] = False
    assert (rgb[outside] == rgb[0, 0]).all() and not (rgb[~outside] == rgb[0, 0]).all()
    assert json.loads(json.dumps(res.to_dict()))["stage1_lung_box"] == [20, 60, 10, 50]


def test_weights_trained_on_lung_boxes_make_the_bundle_segment_a_real_film(tmp_path):
    """Stage-1 weights whose ``models/train_info.json`` records ``lung_box_margin`` are run with
    ``inference_lungbox.json`` on top (the shipped X-ray lung segmenter, then the crop): on a real child's film the
    box covers the lung fields, not the whole film."""
    film = data_path("cxr", "kermany", "train", "NORMAL", "IM-0115-0001.jpeg")
    seg = bundles_root() / LUNG_SEGMENTATION_BUNDLE
    if not (seg / "models" / "model.pt").is_file():
        pytest.skip(f"no trained X-ray lung segmenter weights in {seg / 'models'}")
    root = copy_bundles_with_random_weights(tmp_path / "bundles", threshold=0.5)
    shutil.copytree(seg, root / LUNG_SEGMENTATION_BUNDLE)
    info = root / STAGE1_BUNDLE / "models" / "train_info.json"
    info.write_text(json.dumps({"spatial_size": [64, 64], "lung_box_margin": None}))
    assert CXRCascade.from_bundles(root, device="cpu").predict(film).stage1_lung_box is None

    info.write_text(json.dumps({"spatial_size": [64, 64], "lung_box_margin": 0.05}))
    cascade = CXRCascade.from_bundles(root, device="cpu")
    res = cascade.predict(film)
    r0, r1, c0, c1 = res.stage1_lung_box
    with Image.open(film) as im:
        w, h = im.size
    share = (r1 - r0) * (c1 - c0) / (h * w)
    assert 0.2 < share < 0.95, res.stage1_lung_box  # the lungs and their margin, not the whole film
    assert res.models["stage1"]["lung_box_margin"] == 0.05 and cascade.stage1.spatial_size == [64, 64]
    assert res.models["stage1"]["lung_segmentation"]["bundle"] == LUNG_SEGMENTATION_BUNDLE

    # the bundle's own inference run (inference.json + inference_lungbox.json) crops the same way: same answer
    import csv

    from monai.bundle import run as bundle_run

    films = tmp_path / "films"
    films.mkdir()
    shutil.copy(film, films / film.name)
    bdir = root / STAGE1_BUNDLE
    bundle_run(config_file=[str(bdir / "configs" / "inference.json"), str(bdir / "configs" / "inference_lungbox.json")],
               bundle_root=str(bdir), dataset_dir=str(films), spatial_size=[64, 64], num_workers=0,
               device="$torch.device('cpu')", output_dir=str(tmp_path / "pred"))
    with open(tmp_path / "pred" / "predictions.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    for c in ("normal", "bacterial", "viral"):
        assert float(row[f"prob_{c}"]) == pytest.approx(res.stage1_probabilities[c], abs=1e-5)

    # the calibration of such weights (ctcovid cxr calibrate) sees the same crops as the cascade
    from ctcovid.cli.main import main

    assert main(["cxr", "calibrate", "--bundle-dir", str(root), "--limit", "3", "--device", "cpu",
                 "--spatial-size", "64", "--data-root", str(data_path("cxr", "kermany"))]) == 0
    report = json.loads((bdir / "models" / "calibration_report.json").read_text())
    scan = report["scans"][0]
    expected = cascade.predict(data_path("cxr", "kermany", scan["name"])).stage1_probabilities
    assert scan["probabilities"] == pytest.approx([expected[c] for c in ("normal", "bacterial", "viral")], abs=1e-5)

    # no segmenter weights: refused when the cascade is loaded (the CLI's exit 3), not per image
    from ctcovid.bundle.errors import MissingWeightsError

    (root / LUNG_SEGMENTATION_BUNDLE / "models" / "model.pt").rename(tmp_path / "seg.pt")
    with pytest.raises(MissingWeightsError, match=LUNG_SEGMENTATION_BUNDLE):
        CXRCascade.from_bundles(root, device="cpu")

    (root / STAGE1_BUNDLE / "configs" / "inference_lungbox.json").unlink()
    with pytest.raises(FileNotFoundError, match="inference_lungbox.json"):
        CXRCascade.from_bundles(root, device="cpu")


def test_lung_box_training_config_crops_training_and_validation_films(tmp_path):
    """train.json + train_adult.json + train_lungbox.json: training items carry their cached mask; validation (and
    evaluate.json / calibrate.json stacked on it) segments the film as inference does; both give the network the
    box crop at the training size."""
    from monai.bundle import ConfigParser
    from monai.transforms import Resize

    from ctcovid.io import load_xray

    cxr = data_path("cxr")
    if not (bundles_root() / LUNG_SEGMENTATION_BUNDLE / "models" / "model.pt").is_file():
        pytest.skip("no trained X-ray lung segmenter weights")
    configs = bundles_root() / STAGE1_BUNDLE / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / f) for f in ("train.json", "train_adult.json", "train_lungbox.json")])
    parser.update({"bundle_root": str(configs.parent), "data_root": str(cxr), "mask_root": str(tmp_path),
                   "child_limit": 5, "ckpt_dir": str(tmp_path / "ckpt"), "device": "cpu"})
    items = parser.get_parsed_content("train#datalist")
    assert items and all(it["lung_mask"] == str((tmp_path / it["name"]).with_suffix(".png")) for it in items)
    item = next(it for it in items if it["domain"] == "child")
    with Image.open(item["image"]) as im:
        w, h = im.size
    lung = np.zeros((h, w), dtype=np.uint8)
    lung[h // 4: h // 2, w // 4: 3 * w // 4] = 255  # a box a quarter of the film high, half wide
    Path(item["lung_mask"]).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(lung).save(item["lung_mask"])
    train = parser.get_parsed_content("train#preprocessing")(dict(item))
    assert tuple(train["image"].shape) == (3, 224, 224) and "lung_mask" not in train

    film = load_xray(item["image"])
    val_item = {k: v for k, v in item.items() if k != "lung_mask"}  # validation has no mask files
    got = parser.get_parsed_content("validate#preprocessing")(val_item)
    assert tuple(got["image"].shape) == (3, 224, 224) and "lung_mask" not in got
    seg_box = LungBoxCrop(0.05).box(parser.get_parsed_content("validate#preprocessing").transforms[1](
        {"image": film})["lung_mask"])
    r0, r1, c0, c1 = seg_box
    assert 0.2 < (r1 - r0) * (c1 - c0) / (h * w) < 0.95, seg_box  # the segmenter's lungs, not the whole film
    expected = Resize((224, 224), mode="bilinear", anti_aliasing=True)(film[:, r0:r1, c0:c1])
    assert torch.allclose(torch.as_tensor(got["image"][0]), torch.as_tensor(expected)[0], atol=1e-5)
