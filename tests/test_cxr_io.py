"""X-ray reader (PNG / JPEG / DICOM radiographs), its errors, and the X-ray CLAHE transforms.

Real files: ieee8023 JPEG (grey) and manual-mask PNG, Kermany JPEG (stored RGB), and a MONOCHROME1 chest
CR DICOM (pydicom-data RG1_UNCR). Format variants the shared data lacks (RGBA / palette / 16-bit PNG,
DICOM without window, multi-frame) are written from those real images into tmp_path.
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
import torch
from conftest import data_path
from monai.data import MetaTensor
from monai.transforms import Compose
from PIL import Image

from ctcovid.io import LoadXRayd, load_xray
from ctcovid.io.errors import (
    CorruptFileError,
    DimensionalityError,
    ImageTooSmallError,
    InputNotFoundError,
    NonFiniteValuesError,
    UnsupportedFormatError,
)
from ctcovid.transforms import CLAHE, CLAHEd, RandCLAHEd


@pytest.fixture(scope="module")
def ieee_jpg():
    return data_path("cxr", "ieee8023", "images", "02b76460.jpg")


@pytest.fixture(scope="module")
def rg1():
    return data_path("fixtures", "pydicom_data_pypi", "RG1_UNCR.dcm")


def _assert_xray(x, shape):
    assert isinstance(x, MetaTensor) and x.dtype == torch.float32
    assert tuple(x.shape) == (1, *shape)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


# ---------------------------------------------------------------- real files


def test_ieee8023_jpeg_grey(ieee_jpg):
    x = load_xray(ieee_jpg)
    ref = np.asarray(Image.open(ieee_jpg), dtype=np.float64) / 255.0  # stored 8-bit grey (mode L)
    _assert_xray(x, ref.shape)
    np.testing.assert_allclose(x[0].numpy(), ref, atol=1e-6)
    assert x.meta["source_format"] == "JPEG" and x.meta["original_bit_depth"] == 8
    assert x.meta["photometric_interpretation"] == "MONOCHROME2"
    assert x.meta["filename_or_obj"] == str(ieee_jpg)


def test_kermany_rgb_jpeg_becomes_grey():
    path = data_path("cxr", "kermany", "train", "NORMAL", "IM-0115-0001.jpeg")
    img = Image.open(path)
    assert img.mode == "RGB"
    x = load_xray(path)
    _assert_xray(x, (img.height, img.width))
    np.testing.assert_allclose(x[0].numpy(), np.asarray(img.convert("L"), dtype=np.float64) / 255.0, atol=1e-6)
    assert x.meta["photometric_interpretation"] == "RGB"


def test_real_png_mask():
    path = data_path("cxr", "ieee8023", "lung_masks", "02b76460.png")
    x = load_xray(path)
    assert x.meta["source_format"] == "PNG"
    assert set(np.unique(x[0].numpy()).round(3)) <= {0.0, 0.498, 1.0}  # {0, 127, 255} / 255


def test_monochrome1_dicom_is_inverted_so_lungs_are_dark(rg1):
    x = load_xray(rg1)
    ds = pydicom.dcmread(rg1)
    raw = ds.pixel_array.astype(np.float64)
    _assert_xray(x, raw.shape)
    assert x.meta["photometric_interpretation"] == "MONOCHROME1" and x.meta["source_format"] == "DICOM"
    assert x.meta["original_bit_depth"] == 15 and x.meta["intensity_scaling"] == "voi_window"
    a = x[0].numpy()
    h, w = a.shape
    lungs = np.r_[a[int(0.2 * h) : int(0.45 * h), int(0.18 * w) : int(0.35 * w)].ravel(),
                  a[int(0.2 * h) : int(0.45 * h), int(0.62 * w) : int(0.8 * w)].ravel()]
    mediastinum = a[int(0.2 * h) : int(0.7 * h), int(0.45 * w) : int(0.55 * w)]
    assert lungs.mean() + 0.15 < mediastinum.mean()  # MONOCHROME2: air dark, bone/soft tissue bright
    # stored MONOCHROME1 values are high for air: the output must fall as the raw value rises
    assert np.corrcoef(raw[::8, ::8].ravel(), a[::8, ::8].ravel())[0, 1] < -0.99


def test_dicom_without_window_uses_data_range(rg1, tmp_path):
    ds = pydicom.dcmread(rg1)
    del ds.WindowCenter, ds.WindowWidth
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(tmp_path / "nowin.dcm")
    x = load_xray(tmp_path / "nowin.dcm")
    raw = ds.pixel_array.astype(np.float64)
    np.testing.assert_allclose(x[0].numpy(), (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
    assert x.meta["intensity_scaling"] == "min_max"


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA"])
def test_colour_palette_alpha_pngs(ieee_jpg, tmp_path, mode):
    grey = Image.open(ieee_jpg)
    if mode == "P":  # adaptive palette: a grey image keeps (nearly) all its 256 levels
        img = grey.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    else:
        img = grey.convert("RGB").convert(mode) if mode == "RGBA" else grey.convert("LA")
    img.save(tmp_path / "x.png")
    x = load_xray(tmp_path / "x.png")
    _assert_xray(x, (grey.height, grey.width))
    expected = np.asarray(Image.open(tmp_path / "x.png").convert("L"), dtype=np.float64) / 255.0
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-6)
    # palette quantisation loses a little; grey values stay close to the original
    assert np.abs(x[0].numpy() - np.asarray(grey) / 255.0).mean() < 0.02


def test_16bit_png_scaled_by_bit_depth(tmp_path):
    arr = (np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) * 21).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "x16.png")
    x = load_xray(tmp_path / "x16.png")
    assert x.meta["original_bit_depth"] == 16
    np.testing.assert_allclose(x[0].numpy(), arr / 65535.0, atol=1e-6)


def test_cmyk_jpeg_is_read_as_grey(ieee_jpg, tmp_path):
    """A CMYK JPEG (print workflows) converts to the same grey radiograph within JPEG and CMYK rounding."""
    grey = Image.open(ieee_jpg).convert("L")
    grey.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    x = load_xray(tmp_path / "cmyk.jpg")
    _assert_xray(x, (grey.height, grey.width))
    assert np.abs(x[0].numpy() - np.asarray(grey) / 255.0).mean() < 0.02


@pytest.mark.parametrize("shape", [(1, 1), (31, 400), (400, 20)])
def test_too_small_images_are_refused(tmp_path, shape):
    Image.fromarray(np.full(shape, 128, np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(ImageTooSmallError, match=rf"tiny.png: image is {shape[0]}x{shape[1]} pixels"):
        load_xray(tmp_path / "tiny.png")


def test_dictionary_twin_in_compose(ieee_jpg, rg1):
    out = Compose([LoadXRayd(keys=["image", "mask"], allow_missing_keys=True)])({"image": str(ieee_jpg)})
    assert isinstance(out["image"], MetaTensor) and "mask" not in out


# ---------------------------------------------------------------- errors name the file and the problem


def test_errors(ieee_jpg, rg1, tmp_path):
    with pytest.raises(InputNotFoundError, match="no such file"):
        load_xray(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty.png: file is empty"):
        load_xray(tmp_path / "empty.png")
    data = ieee_jpg.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="cut.jpg: truncated or corrupt"):
        load_xray(tmp_path / "cut.jpg")
    (tmp_path / "noise.png").write_bytes(b"not an image at all" * 10)
    with pytest.raises(CorruptFileError, match="noise.png"):
        load_xray(tmp_path / "noise.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedFormatError, match="notes.txt: unsupported format"):
        load_xray(tmp_path / "notes.txt")
    with pytest.raises(UnsupportedFormatError, match="folder"):
        load_xray(tmp_path)
    frames = [Image.open(ieee_jpg), Image.open(ieee_jpg).rotate(5)]
    frames[0].save(tmp_path / "multi.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(DimensionalityError, match="multi.tif: TIFF holds 2 frames"):
        load_xray(tmp_path / "multi.tif")
    nan = np.ones((16, 16), np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(NonFiniteValuesError, match="nan.tif"):
        load_xray(tmp_path / "nan.tif")


def test_dicom_errors(rg1, tmp_path):
    ds = pydicom.dcmread(rg1)
    multi = copy.deepcopy(ds)
    multi.NumberOfFrames = 2
    multi.PixelData = ds.PixelData * 2
    multi.save_as(tmp_path / "multi.dcm")
    with pytest.raises(DimensionalityError, match="multi.dcm: multi-frame DICOM with 2 frames"):
        load_xray(tmp_path / "multi.dcm")
    nopix = copy.deepcopy(ds)
    del nopix.PixelData
    nopix.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(CorruptFileError, match="nopix.dcm: DICOM file has no pixel data"):
        load_xray(tmp_path / "nopix.dcm")
    data = rg1.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="cut.dcm"):
        load_xray(tmp_path / "cut.dcm")


# ---------------------------------------------------------------- CLAHE


def _local_contrast(a: np.ndarray, block: int = 16) -> float:
    h, w = (a.shape[0] // block) * block, (a.shape[1] // block) * block
    tiles = a[:h, :w].reshape(h // block, block, w // block, block)
    return float(tiles.std(axis=(1, 3)).mean())


def test_clahe_raises_local_contrast_and_keeps_range(ieee_jpg):
    x = load_xray(ieee_jpg)
    y = CLAHE(clip_limit=0.02)(x)
    assert isinstance(y, MetaTensor) and y.shape == x.shape and y.dtype == torch.float32
    assert y.meta["filename_or_obj"] == str(ieee_jpg)
    assert float(y.min()) >= float(x.min()) - 1e-6 and float(y.max()) <= float(x.max()) + 1e-6
    assert _local_contrast(y[0].numpy()) > 1.2 * _local_contrast(x[0].numpy())
    # a stronger clip limit enhances more; a constant image is left alone
    z = CLAHEd(keys="image", clip_limit=0.05)({"image": x})["image"]
    assert _local_contrast(z[0].numpy()) > _local_contrast(y[0].numpy())
    flat = torch.full((1, 32, 32), 0.3)
    assert torch.equal(CLAHE()(flat), flat)


def test_clahe_of_a_volume_equalises_each_slice_on_its_own(ieee_jpg):
    """(C, H, W, D): slice k comes out as CLAHE of slice k alone (the CT lesion model's input)."""
    x = load_xray(ieee_jpg)[:, 100:228, 100:228].as_tensor()
    vol = torch.stack([x, 0.5 * x, torch.full_like(x, 0.2)], dim=-1)  # (1, 128, 128, 3)
    out = CLAHE(clip_limit=0.02)(vol)
    assert out.shape == vol.shape
    for k in range(3):
        assert torch.allclose(out[..., k], CLAHE(clip_limit=0.02)(vol[..., k]), atol=1e-6)
    assert not torch.allclose(out[..., 0], vol[..., 0])
    with pytest.raises(ValueError, match=r"\(C, H, W\) or volume"):
        CLAHE()(torch.zeros(1, 1, 4, 4, 4))


def test_rand_clahe_applies_to_a_fraction_prob(ieee_jpg):
    crop = load_xray(ieee_jpg)[:, 200:248, 200:248].as_tensor()
    t = RandCLAHEd(keys="image", prob=0.4, kernel_size=16)
    t.set_random_state(seed=0)
    n = 300
    changed = sum(not torch.equal(t({"image": crop})["image"], crop) for _ in range(n))
    assert abs(changed / n - 0.4) < 0.085  # binomial sd 0.028: +-3 sd
    never, always = RandCLAHEd(keys="image", prob=0.0), RandCLAHEd(keys="image", prob=1.0)
    assert torch.equal(never({"image": crop})["image"], crop)
    assert not torch.equal(always({"image": crop})["image"], crop)
