"""Scans made awkward the way PACS exports are, built from the real COVID-CT-MD series by editing headers with
pydicom (issue 15): each case asserts the right answer, not just "no crash".

- gantry tilt: every slice's origin drifts in-plane and its pixels shift with it (an exact tilted
  re-acquisition of the same anatomy, whole-pixel drifts), so the corrected volume must equal the original;
- a slice exported twice under a new SOP instance UID (identical pixels) is dropped with a note;
- a series whose slice spacing changes half-way is refused as such, not as "missing slices";
- a localizer and a second, shorter series in the folder are named in the notes.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import data_path
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ctcovid.io import load_ct
from ctcovid.io.errors import SlicePositionError
from ctcovid.io.gantry_tilt import correct_gantry_tilt, slice_shear, to_acquired_grid

N_SLICES = 16
SHIFT_ROWS = 2  # rows of in-plane drift per slice


def _middle_slices(n: int = N_SLICES) -> list[pydicom.Dataset]:
    """``n`` consecutive slices (by position) from the middle of COVID-CT-MD normal002, decompressed."""
    folder = data_path("ct", "covid_ct_md", "normal002")
    with pydicom.config.disable_value_validation():
        items = [pydicom.dcmread(f) for f in sorted(folder.iterdir()) if f.is_file()]
    items.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    mid = len(items) // 2
    out = []
    for ds in items[mid - n // 2 : mid - n // 2 + n]:
        arr = ds.pixel_array
        ds.PixelData = arr.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def _write(series: list[pydicom.Dataset], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(series):
        ds.save_as(folder / f"IM{i:04d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    return _write(_middle_slices(), tmp_path_factory.mktemp("straight") / "series")


@pytest.fixture(scope="module")
def tilted(tmp_path_factory) -> Path:
    """The same slices as if acquired with a tilted gantry: slice k's origin moves k*SHIFT_ROWS rows along the
    column direction and its pixels move up as many rows, so every world point keeps its value."""
    series = _middle_slices()
    for k, ds in enumerate(series):
        arr = ds.pixel_array
        s = k * SHIFT_ROWS
        moved = np.full_like(arr, arr.min())
        moved[: arr.shape[0] - s] = arr[s:]
        ds.PixelData = moved.tobytes()
        col_dir = np.asarray([float(v) for v in ds.ImageOrientationPatient[3:]])
        row_spacing = float(ds.PixelSpacing[0])
        ds.ImagePositionPatient = [float(v) for v in np.asarray(ds.ImagePositionPatient, float) + s * row_spacing * col_dir]
    return _write(series, tmp_path_factory.mktemp("tilted") / "series")


def test_tilted_series_is_resampled_onto_the_straight_grid(straight, tilted):
    ref, got = load_ct(straight), load_ct(tilted)
    np.testing.assert_allclose(np.asarray(got.meta["affine"]), np.asarray(ref.meta["affine"]), atol=1e-4)
    # every voxel that was inside the tilted field of view has its original value; the rest is air fill
    a, b = ref[0].numpy(), got[0].numpy()
    for k in range(N_SLICES):  # slice k was acquired from row k*SHIFT_ROWS of the straight grid on
        first = k * SHIFT_ROWS
        np.testing.assert_array_equal(b[:, first:, k], a[:, first:, k])
        assert np.all(b[:, :first, k] == a.min())
    step = float(np.linalg.norm(np.asarray(ref.meta["affine"])[:3, 2]))
    drift = SHIFT_ROWS * float(ref.meta["spacing"][1])
    notes = got.meta["input_notes"]
    assert f"gantry tilt {math.degrees(math.atan2(drift, step)):.1f} deg" in notes
    assert got.meta["spacing"][2] == pytest.approx(step, rel=1e-6)  # the distance between planes
    assert got.meta["tilt_drift_voxels"] == pytest.approx((0.0, SHIFT_ROWS))
    assert ref.meta["input_notes"] == ""


def test_sheared_affine_split_and_fractional_drift_round_trip():
    rng = np.random.default_rng(0)
    vol = rng.random((20, 24, 6)).astype(np.float32)
    aff = np.diag([0.7, 0.7, 2.0, 1.0])
    aff[1, 2] = 0.7 * 0.5  # half a voxel of drift along Y per slice: 10 deg
    normal, distance, drift = slice_shear(aff)
    np.testing.assert_allclose(normal, [0, 0, 1])
    assert distance == pytest.approx(2.0) and np.linalg.norm(drift) == pytest.approx(0.35)
    out, new_aff, corr = correct_gantry_tilt(vol, aff)
    assert corr.drift_voxels == pytest.approx((0.0, 0.5)) and corr.tilt_deg == pytest.approx(math.degrees(math.atan(0.175)))
    np.testing.assert_allclose(new_aff[:3, :3], np.diag([0.7, 0.7, 2.0]))
    # a voxel's world position is kept: corrected (i, j, k) = acquired (i, j - 0.5 k, k), linear interpolation
    k, j = 4, 10
    np.testing.assert_allclose(out[:, j, k], vol[:, j - 2, k], rtol=1e-6)
    np.testing.assert_allclose(out[:, j, 1], 0.5 * (vol[:, j, 1] + vol[:, j - 1, 1]), rtol=1e-5)
    # back onto the acquired slices (what the DICOM SEG needs): whole-voxel drifts return exactly
    mask = (rng.random((20, 24, 6)) > 0.5).astype(np.uint8)
    whole = to_acquired_grid(correct_gantry_tilt(mask, _with_drift(aff, 2.0))[0], (0.0, 2.0))
    for k in range(6):  # rows shifted out of the grid and back are lost; the rest returns exactly
        np.testing.assert_array_equal(whole[:, : 24 - 2 * k, k], mask[:, : 24 - 2 * k, k])
        assert not whole[:, 24 - 2 * k :, k].any()
    # an untilted affine (rounding-level drift) is left alone
    flat = np.diag([0.7, 0.7, 2.0, 1.0])
    flat[1, 2] = 1e-4
    assert correct_gantry_tilt(vol, flat)[2] is None


def _with_drift(aff: np.ndarray, voxels: float) -> np.ndarray:
    out = aff.copy()
    out[1, 2] = aff[1, 1] * voxels
    return out


def test_tilted_scan_masks_land_on_the_scan_in_nibabel_simpleitk_and_itk(seg_only_bundles, straight, tilted, tmp_path):
    import itk
    import SimpleITK as sitk

    from ctcovid.ct import CTCovidPipeline

    pipeline = CTCovidPipeline(bundle_dir=seg_only_bundles, device="cpu", skip_missing=True, gradcam=False)
    ref = pipeline(straight)
    got = pipeline(tilted)
    assert got.status == "ok", got.reason
    tilt_notes = [n for n in got.to_dict()["scan"]["input_notes"] if "gantry tilt" in n]
    assert len(tilt_notes) == 1 and tilt_notes[0].endswith("outputs are on the corrected grid")  # one whole note
    # true voxel volume: same lung volume as the untilted scan, up to the rows lost at the field of view's edge
    assert got.lung_volume_ml == pytest.approx(ref.lung_volume_ml, rel=0.03)
    got.save(tmp_path, montage=False)
    path = tmp_path / f"{got.scan_id}_lung_mask.nii.gz"
    img = nib.load(path)
    qform, sform = img.get_qform(), img.get_sform()
    np.testing.assert_allclose(qform, sform, atol=1e-4)  # the two NIfTI geometry fields agree
    np.testing.assert_allclose(sform, np.asarray(load_ct(straight).meta["affine"]), atol=1e-3)
    lps = np.diag([-1.0, -1.0, 1.0])  # ITK's physical space is LPS
    for reader in (sitk.ReadImage(str(path)), itk.imread(str(path))):
        if isinstance(reader, sitk.Image):
            origin, spacing = np.array(reader.GetOrigin()), np.array(reader.GetSpacing())
            direction = np.array(reader.GetDirection()).reshape(3, 3)
        else:
            origin, spacing = np.array(reader.GetOrigin()), np.array(reader.GetSpacing())
            direction = itk.array_from_matrix(reader.GetDirection())
        np.testing.assert_allclose(lps @ sform[:3, 3], origin, atol=1e-3)
        np.testing.assert_allclose(lps @ sform[:3, :3], direction * spacing, atol=1e-3)


def test_slice_written_twice_is_dropped_with_a_note(straight, tmp_path):
    folder = shutil.copytree(straight, tmp_path / "dup")
    ds = pydicom.dcmread(folder / "IM0005.dcm")
    ds.SOPInstanceUID = generate_uid()  # a second instance of the same slice
    ds.save_as(folder / "IM9999.dcm", enforce_file_format=True)
    got = load_ct(folder)
    assert got.shape[-1] == N_SLICES
    np.testing.assert_array_equal(got[0].numpy(), load_ct(straight)[0].numpy())
    assert "dropped 1 duplicate slice(s) at the same position with identical pixels: IM9999.dcm (= IM0005.dcm)" in (
        got.meta["input_notes"]
    ) or "IM0005.dcm (= IM9999.dcm)" in got.meta["input_notes"]

    # same position, different pixels: which one is right cannot be known, so the series is refused
    arr = ds.pixel_array.copy()
    arr[:10] = arr.max()
    ds.PixelData = arr.tobytes()
    ds.save_as(folder / "IM9999.dcm", enforce_file_format=True)
    with pytest.raises(SlicePositionError, match="duplicate slice position"):
        load_ct(folder)


def test_change_of_slice_spacing_is_named_not_called_missing_slices(tmp_path):
    series = _middle_slices()
    normal = np.cross(*(np.asarray([float(v) for v in series[0].ImageOrientationPatient[i : i + 3]]) for i in (0, 3)))
    origin = np.asarray(series[0].ImagePositionPatient, float)
    step = float(np.linalg.norm(np.asarray(series[1].ImagePositionPatient, float) - origin))
    z = [k * step if k < 8 else 7 * step + (k - 7) * 2 * step for k in range(N_SLICES)]  # 8 thin, then thick
    for ds, d in zip(series, z):
        ds.ImagePositionPatient = [float(v) for v in origin + d * normal]
    folder = _write(series, tmp_path / "mixed")
    with pytest.raises(SlicePositionError) as e:
        load_ct(folder)
    msg = str(e.value)
    assert f"slice spacing changes from {step:.3f} mm to {2 * step:.3f} mm" in msg and "missing" not in msg


def test_localizer_and_second_series_are_named_in_the_notes(straight, tmp_path):
    folder = shutil.copytree(straight, tmp_path / "study")
    scout = pydicom.dcmread(folder / "IM0000.dcm")
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = generate_uid()
    scout.SeriesInstanceUID = generate_uid()
    scout.save_as(folder / "SCOUT.dcm", enforce_file_format=True)
    other_uid = generate_uid()
    for i in range(3):  # a short second series (e.g. a few thick reformats)
        ds = pydicom.dcmread(folder / f"IM{i:04d}.dcm")
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber = other_uid, generate_uid(), 99
        ds.save_as(folder / f"OTHER{i}.dcm", enforce_file_format=True)
    got = load_ct(folder)
    notes = got.meta["input_notes"]
    assert got.shape[-1] == N_SLICES
    assert "1 localizer" in notes and "#99" in notes and "3 slice(s)" in notes


@pytest.mark.parametrize("layout", ["coronal", "sagittal"])
def test_non_axial_nifti_is_segmented_axially_and_masks_come_back_in_its_voxel_order(
    seg_only_bundles, tmp_path, layout
):
    """MedSeg rp4 re-stored with nibabel with coronal (or sagittal) slices on the third axis: the same scan, so
    the same lung mask as the axial file, returned in the re-stored file's own voxel order and affine."""
    from ctcovid.ct import CTCovidPipeline

    src = nib.load(data_path("ct", "medseg", "images", "rp4.nii.gz"))
    data = np.asarray(src.dataobj, dtype=np.float32)[::2, ::2, 14:26]  # 12 lung slices, half resolution
    axial_aff = src.affine @ np.diag([2.0, 2.0, 1.0, 1.0])
    axial_aff[:3, 3] = (src.affine @ np.array([0, 0, 14, 1]))[:3]
    axial = tmp_path / "axial.nii.gz"
    nib.save(nib.Nifti1Image(data, axial_aff), axial)
    # coronal: (X, Z, Y) with Y flipped, i.e. third axis anterior-posterior; sagittal: (Y, Z, X)
    perm = {"coronal": [[0, 1], [2, 1], [1, -1]], "sagittal": [[1, 1], [2, 1], [0, 1]]}[layout]
    ornt = np.array(perm, dtype=float)
    restored = nib.Nifti1Image(data, axial_aff).as_reoriented(ornt)
    other = tmp_path / f"{layout}.nii.gz"
    nib.save(restored, other)
    assert nib.aff2axcodes(restored.affine)[2] not in ("S", "I")

    pipeline = CTCovidPipeline(bundle_dir=seg_only_bundles, device="cpu", skip_missing=True, gradcam=False)
    ref, got = pipeline(axial), pipeline(other)
    assert got.status == "ok", got.reason
    notes = got.to_dict()["scan"]["input_notes"]
    assert any("reoriented to LPS" in n for n in notes) and got.to_dict()["scan"]["input_orientation"]
    assert got.lung_volume_ml == pytest.approx(ref.lung_volume_ml, rel=1e-6)
    got.save(tmp_path / "out", montage=False)
    written = nib.load(tmp_path / "out" / f"{got.scan_id}_lung_mask.nii.gz")
    assert written.shape == restored.shape
    np.testing.assert_allclose(written.affine, restored.affine, atol=1e-4)
    ref.save(tmp_path / "ref", montage=False)
    ref_mask = nib.load(tmp_path / "ref" / f"{ref.scan_id}_lung_mask.nii.gz")
    # the same voxels, seen through the re-stored file's orientation
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(ref_mask.as_reoriented(ornt).dataobj))


def test_absurd_volume_size_is_refused_from_the_header_before_reading(tmp_path, straight, monkeypatch):
    from ctcovid.io.errors import VolumeTooLargeError

    # a header claiming 4096^3 voxels (256 GiB as float32) over a few bytes of data: refused from the header
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4096, 4096, 4096))
    hdr.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * (352 - len(hdr.binaryblock)) + b"\0" * 64)
    with pytest.raises(VolumeTooLargeError, match=r"huge.nii.*4096 x 4096 x 4096 = 68719 M voxels.*CTCOVID_MAX_VOXELS"):
        load_ct(path)
    # a DICOM series is measured from its headers before its pixels are decoded; the limit is configurable
    monkeypatch.setenv("CTCOVID_MAX_VOXELS", str(512 * 512 * (N_SLICES - 1)))
    with pytest.raises(VolumeTooLargeError, match=f"512 x 512 x {N_SLICES}"):
        load_ct(straight)
    monkeypatch.setenv("CTCOVID_MAX_VOXELS", str(512 * 512 * N_SLICES))
    assert load_ct(straight).shape[-1] == N_SLICES


def test_console_line_prints_each_input_note_on_its_own_line():
    from ctcovid.cli.predict import scan_line

    row = {"scan_id": "s1", "status": "ok", "lung_volume_ml": "4000", "lung_involvement_percent": "",
           "infection_status": "skipped: no weights",
           "input_notes": "chose series #2 (x, 40 slice(s)); other series: series #99 | gantry tilt 15.0 deg: resampled"}
    lines = scan_line(row).splitlines()
    assert lines[0].startswith("  s1: lung 4000 ml")
    assert lines[1:] == ["    note: chose series #2 (x, 40 slice(s)); other series: series #99",
                         "    note: gantry tilt 15.0 deg: resampled"]
