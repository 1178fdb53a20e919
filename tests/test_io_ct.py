"""``ctcovid.io.load_ct`` on real data: DICOM series, NIfTI, slice folders, MONAI round trips.

What the TotalSegmentator fixtures are (checked, see the report): ``example_ct_dicom`` (20 slices, z -804.5
.. -766.5 mm) and ``example_ct.nii.gz`` (112 slices, z 94.3 .. 427.3 mm) are *different* scans (disjoint
world extents; TotalSegmentator ships a separate reference segmentation for the DICOM), so no voxel of
one can be compared with the other. The honest cross-format checks here are instead: (1) every DICOM
file's own header geometry and pixel values against the volume at the same world point, (2) our DICOM
volume against SimpleITK/GDCM's independent series read, (3) DICOM -> MONAI SaveImage NIfTI -> load_ct
round trip (same affine, same HU), and (4) our NIfTI read against nibabel/MONAI LoadImage.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import LoadImage

from ctcovid.io import load_ct
from ctcovid.io.errors import CTInputError

logging.getLogger("pydicom").setLevel(logging.ERROR)  # COVID-CT-MD has non-numeric (anonymised) UIDs


def _headers_by_position(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """Files of a series sorted by IPP z (independent of the reader; these series are axial)."""
    with pydicom.config.disable_value_validation():  # COVID-CT-MD's anonymised UIDs are not numeric
        items = [
            (p, pydicom.dcmread(p, stop_before_pixels=True)) for p in sorted(folder.iterdir()) if p.is_file()
        ]
    return sorted(items, key=lambda item: float(item[1].ImagePositionPatient[2]))


def _hu(path: Path) -> np.ndarray:
    """One file's pixels in HU, decoded by pydicom (rows, columns)."""
    with pydicom.config.disable_value_validation():
        ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture(scope="module")
def covid_volume(covid_ct_md_series):
    return load_ct(covid_ct_md_series)


@pytest.fixture(scope="module")
def covid_headers(covid_ct_md_series):
    return _headers_by_position(covid_ct_md_series)


@pytest.fixture(scope="module")
def totalseg_dicom(totalseg_dir):
    return load_ct(totalseg_dir / "example_ct_dicom")


# ----------------------------------------------------------------------------- COVID-CT-MD


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # anonymised, non-numeric UIDs
def test_covid_ct_md_series_reads_to_167_hu_slices(covid_volume, covid_headers, covid_ct_md_series):
    img, meta = covid_volume, covid_volume.meta
    assert tuple(img.shape) == (1, 512, 512, 167) and img.dtype == torch.float32
    assert meta["source_format"] == "dicom" and meta["intensity_domain"] == "hu"
    assert meta["num_slices"] == 167 and meta["spacing_known"] is True
    first = covid_headers[0][1]
    ps = [float(v) for v in first.PixelSpacing]
    assert meta["spacing"] == pytest.approx((ps[1], ps[0], 2.0))
    z = np.array([float(ds.ImagePositionPatient[2]) for _, ds in covid_headers])
    assert np.all(np.diff(z) > 0) and np.allclose(np.diff(z), 2.0)  # the data: strictly monotonic, 2 mm
    assert meta["series_instance_uid"] == str(first.SeriesInstanceUID)
    assert "167 slice(s)" in meta["series_selection"] and "JPEG Lossless" in meta["transfer_syntax"]
    assert meta["orientation"] == "LPS" and meta["filename_or_obj"] == str(covid_ct_md_series)
    # the affine's slice positions run along the sorted IPPs
    world_z = [(img.affine.numpy() @ [0, 0, k, 1])[2] for k in range(167)]
    np.testing.assert_allclose(world_z, z, atol=1e-4)


def test_covid_ct_md_values_are_hu_and_slices_in_position_order(covid_volume, covid_headers):
    vol = covid_volume[0].numpy()
    assert vol.min() >= -1024 and vol.max() <= 3071  # uint16 stored + intercept -1024
    air = vol[(vol > -1023) & (vol < -900)]  # excluding the -1024 fill outside the reconstruction circle
    assert -1010 < np.median(air) < -980
    for k in (0, 83, 166):  # slice k is the k-th file by position, shown as image[0, :, :, k].T
        np.testing.assert_array_equal(vol[:, :, k].T, _hu(covid_headers[k][0]))


# ----------------------------------------------------------------------------- TotalSegmentator DICOM


def test_totalseg_dicom_matches_each_file_header_and_pixels(totalseg_dicom, totalseg_dir):
    """Same physical point -> same HU: each file's IPP/IOP/PixelSpacing locate its pixels in our volume."""
    assert tuple(totalseg_dicom.shape) == (1, 512, 512, 20)
    assert "JPEG 2000" in totalseg_dicom.meta["transfer_syntax"]
    inv = np.linalg.inv(totalseg_dicom.affine.numpy())
    vol = totalseg_dicom[0].numpy()
    for path, ds in _headers_by_position(totalseg_dir / "example_ct_dicom")[::6]:
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
        hu = _hu(path)
        for i, j in [(0, 0), (100, 300), (511, 17)]:  # column i, row j of this file
            lps = ipp + iop[:3] * col_sp * i + iop[3:] * row_sp * j
            idx = inv @ np.array([-lps[0], -lps[1], lps[2], 1.0])
            np.testing.assert_allclose(idx[:3], np.round(idx[:3]), atol=1e-6)
            ii, jj, kk = (int(round(v)) for v in idx[:3])
            assert (ii, jj) == (i, j)
            assert vol[ii, jj, kk] == hu[j, i]


def test_totalseg_dicom_agrees_with_simpleitk_gdcm_series_read(totalseg_dicom, totalseg_dir):
    """GDCM sorts the files itself; its geometry and voxels must equal ours."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(totalseg_dir / "example_ct_dicom")))
    ref = reader.Execute()
    direction = np.array(ref.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(ref.GetSpacing())
    lps[:3, 3] = ref.GetOrigin()
    ref_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    ref_xyz = sitk.GetArrayFromImage(ref).transpose(2, 1, 0).astype(np.float32)
    ours = totalseg_dicom[0].numpy()
    if ref_affine[2, 2] < 0:  # GDCM may order superior -> inferior: flip to compare
        ref_xyz = ref_xyz[:, :, ::-1]
        ref_affine = ref_affine @ np.array(
            [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, ref_xyz.shape[2] - 1], [0, 0, 0, 1]]
        )
    np.testing.assert_allclose(totalseg_dicom.affine.numpy(), ref_affine, atol=1e-4)
    np.testing.assert_array_equal(ours, ref_xyz)


def test_pydicom_and_simpleitk_backends_decode_identically(totalseg_dicom, totalseg_dir):
    """JPEG 2000 via pydicom (+Pillow/openjpeg) and via GDCM give the same HU."""
    other = load_ct(totalseg_dir / "example_ct_dicom", backend="pydicom")
    np.testing.assert_array_equal(other.numpy(), totalseg_dicom.numpy())
    np.testing.assert_array_equal(other.affine.numpy(), totalseg_dicom.affine.numpy())


def test_dicom_survives_monai_crop_spacing_invert_and_saveimage_round_trip(
    totalseg_dicom, totalseg_dir, tmp_path
):
    """LoadCTd -> crop/Orientationd/Spacingd -> Invertd -> SaveImaged -> load_ct: back on the DICOM grid."""
    from monai.transforms import Compose, Invertd, Orientationd, SaveImaged, Spacingd, SpatialCropd

    from ctcovid.io import LoadCTd

    src = totalseg_dir / "example_ct_dicom"
    pre = Compose(
        [
            LoadCTd("image"),
            SpatialCropd("image", roi_start=(192, 160, 0), roi_end=(320, 352, 20)),  # keeps the test fast
            Orientationd("image", axcodes="RAS", labels=None),
            Spacingd("image", pixdim=(2.0, 2.0, 2.0)),
        ]
    )
    d = pre({"image": str(src)})
    assert tuple(d["image"].shape) == (1, 63, 94, 20)
    d["pred"] = d["image"].clone()
    d = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(d)
    SaveImaged(
        "pred",
        output_dir=tmp_path,
        output_postfix="pred",
        separate_folder=False,
        resample=False,
        print_log=False,
    )(d)
    (saved,) = tmp_path.glob("*.nii.gz")
    back, orig = load_ct(saved, domain="hu"), totalseg_dicom  # mostly pad zeros: not HU-like by itself
    assert back.shape == orig.shape
    np.testing.assert_allclose(back.affine.numpy(), orig.affine.numpy(), atol=1e-4)
    # inside the crop the values went through 2 mm and back: close, not equal; outside it is the pad value
    inner = (slice(None), slice(194, 318), slice(162, 350))
    a, b = back[inner].flatten(), orig[inner].flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.98
    assert float(back[0, :150].abs().max()) == 0.0


def test_dicom_to_nifti_keeps_hu_at_same_world_points(totalseg_dicom, tmp_path):
    """Writing our DICOM volume as NIfTI (its own affine) and reading it back keeps every voxel's HU."""
    out = tmp_path / "dicom_as.nii.gz"
    nib.save(nib.Nifti1Image(totalseg_dicom[0].numpy().astype(np.int16), totalseg_dicom.affine.numpy()), out)
    back = load_ct(out)
    np.testing.assert_array_equal(back.numpy(), totalseg_dicom.numpy())
    np.testing.assert_allclose(back.affine.numpy(), totalseg_dicom.affine.numpy(), atol=1e-5)
    assert back.meta["intensity_domain"] == "hu" and back.meta["source_format"] == "nifti"


# ----------------------------------------------------------------------------- NIfTI


def test_totalseg_nifti_matches_nibabel_and_monai_loadimage(totalseg_dir):
    path = totalseg_dir / "example_ct.nii.gz"
    img = load_ct(path)
    ref = nib.load(path)
    assert tuple(img.shape) == (1, *ref.shape) == (1, 122, 101, 112)
    np.testing.assert_array_equal(img[0].numpy(), ref.get_fdata(dtype=np.float32))
    monai_img = LoadImage(image_only=True, ensure_channel_first=True)(path)
    np.testing.assert_array_equal(img.numpy(), monai_img.numpy())
    np.testing.assert_allclose(img.affine.numpy(), monai_img.affine.numpy())
    assert img.meta["intensity_domain"] == "hu" and img.meta["orientation"] == "RAS"
    assert img.meta["spacing"] == pytest.approx((3.0, 3.0, 3.0))
    assert "0.5th percentile" in img.meta["domain_reason"]


@pytest.mark.parametrize("case", ["rp2", "rp4", "rp6", "rp8"])
def test_medseg_volumes_are_display_valued(medseg_dir, case):
    img = load_ct(medseg_dir / "images" / f"{case}.nii.gz")
    assert img.meta["intensity_domain"] == "display"
    assert float(img.min()) >= 0 and float(img.max()) <= 4095
    assert img.meta["orientation"] == "LPS" and img.meta["spacing"][2] == pytest.approx(6.0)


def test_domain_can_be_forced(totalseg_dir):
    img = load_ct(totalseg_dir / "example_ct_sm.nii.gz", domain="display")
    assert img.meta["intensity_domain"] == "display" and "set by the caller" in img.meta["domain_reason"]
    with pytest.raises(ValueError, match="domain"):
        load_ct(totalseg_dir / "example_ct_sm.nii.gz", domain="HU")


# ----------------------------------------------------------------------------- slice folders, edge cases


def test_jpg_slice_folder_reads_in_natural_order(totalseg_dir, tmp_path):
    """12 real CT slices written as 1.jpg .. 12.jpg (some RGB) come back in numeric, not string, order."""
    from PIL import Image

    ct = nib.load(totalseg_dir / "example_ct_sm.nii.gz").get_fdata()[:, :, 5:17]
    windowed = (np.clip((ct + 1350) / 1500, 0, 1) * 255).astype(np.uint8)
    for k in range(12):
        img = Image.fromarray(windowed[:, :, k].T)  # rows = Y, as image[0, :, :, k].T displays
        (img.convert("RGB") if k % 2 else img).save(tmp_path / f"{k + 1}.jpg", quality=95)
    vol = load_ct(tmp_path)
    assert tuple(vol.shape) == (1, 122, 101, 12)
    meta = vol.meta
    assert meta["source_format"] == "slices" and meta["intensity_domain"] == "display"
    assert meta["spacing_known"] is False and meta["spacing"] == (1.0, 1.0, 1.0)
    got = vol[0].numpy()
    # each read slice is most similar to the source slice of the same index (JPEG is lossy)
    corr = np.corrcoef(got.reshape(-1, 12).T, windowed.reshape(-1, 12).T.astype(np.float32))[:12, 12:]
    assert corr.argmax(axis=1).tolist() == list(range(12))
    assert np.abs(got - windowed).mean() < 3


def test_lungmask_two_slices_without_modality_read(shared_data, caplog):
    with caplog.at_level(logging.WARNING, logger="ctcovid.io"):
        img = load_ct(shared_data / "fixtures" / "lungmask_testdata")
    assert tuple(img.shape) == (1, 512, 512, 2)
    assert img.meta["spacing"] == pytest.approx((0.625, 0.625, 1.0))
    assert img.meta["intensity_domain"] == "hu" and "Modality tag missing" in img.meta["series_selection"]
    assert any("no Modality" in r.getMessage() for r in caplog.records)


def test_single_dicom_file_needs_allow_2d(covid_headers):
    path = covid_headers[40][0]
    with pytest.raises(CTInputError) as err:
        load_ct(path)
    assert type(err.value).__name__ == "DimensionalityError"
    assert str(err.value).startswith(f"{path}: is a single 2D image; a CT volume is required")
    img = load_ct(path, allow_2d=True)
    assert tuple(img.shape) == (1, 512, 512, 1)
    assert img.meta["spacing"] == pytest.approx((0.75, 0.75, 2.0))  # z from SliceThickness
    np.testing.assert_array_equal(img[0, :, :, 0].numpy().T, _hu(path))


def test_meta_collates_across_sources(totalseg_dir, medseg_dir):
    """Every meta key is present for every source, so MONAI can batch volumes of mixed origin."""
    from monai.data import list_data_collate
    from monai.transforms import Compose, ResizeWithPadOrCropd

    from ctcovid.io import LoadCTd

    load = Compose([LoadCTd("image"), ResizeWithPadOrCropd("image", (16, 16, 4))])
    a = load({"image": str(totalseg_dir / "example_ct_dicom")})
    b = load({"image": str(totalseg_dir / "example_ct_sm.nii.gz")})
    assert set(a["image"].meta) == set(b["image"].meta)
    batch = list_data_collate([a, b])
    assert tuple(batch["image"].shape) == (2, 1, 16, 16, 4)
    assert list(batch["image"].meta["source_format"]) == ["dicom", "nifti"]


def test_loadctd_from_bundle_config_and_missing_keys(totalseg_dir):
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {"load": {"_target_": "ctcovid.io.LoadCTd", "keys": ["image", "label"], "allow_missing_keys": True}}
    )
    load = parser.get_parsed_content("load")
    out = load({"image": str(totalseg_dir / "example_ct_sm.nii.gz"), "other": 1})
    assert tuple(out["image"].shape) == (1, 122, 101, 30) and out["other"] == 1 and "label" not in out
    from ctcovid.io import LoadCTd

    with pytest.raises(KeyError):
        LoadCTd(keys="label")({"image": "x"})


def test_rescale_is_applied_per_file_by_both_backends(shared_data, tmp_path):
    """Each slice uses its own RescaleSlope/Intercept (float32), whichever decoder runs."""
    src = shared_data / "fixtures" / "lungmask_testdata"
    expected = []
    for name, (slope, intercept) in {"0.dcm": (1.0, 0.0), "1.dcm": (0.5, -7.25)}.items():
        ds = pydicom.dcmread(src / name)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.save_as(tmp_path / name)
        expected.append(ds.pixel_array.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    for backend in ("sitk", "pydicom"):
        vol = load_ct(tmp_path, backend=backend)[0].numpy()
        for k in range(2):  # IPP z of 0.dcm is 0, of 1.dcm is 1: slice order = file order here
            np.testing.assert_array_equal(vol[:, :, k].T, expected[k])
