"""Every bad input to ``load_ct`` raises its own ``CTInputError`` naming the file and the problem.

Bad inputs are made in ``tmp_path`` from real files: a 10-slice consecutive run of the COVID-CT-MD
series (JPEG lossless, anonymised: empty SOPInstanceUIDs) and lungmask's two uncompressed slices
(which do carry SOPInstanceUIDs).
"""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom import config

from ctcovid.io import dicom_decode as dicom_decode_module
from ctcovid.io import load_ct
from ctcovid.io.errors import (
    CorruptFileError,
    DimensionalityError,
    EmptyInputError,
    InconsistentSeriesError,
    InputNotFoundError,
    NoCTSeriesError,
    NonFiniteValuesError,
    SlicePositionError,
    UnsupportedFormatError,
    UnsupportedTransferSyntaxError,
)
from ctcovid.io.pydicom_compat import save_dataset

logging.getLogger("pydicom").setLevel(logging.ERROR)


def _read(path: Path, **kw) -> pydicom.Dataset:
    with config.disable_value_validation():
        return pydicom.dcmread(path, **kw)


@pytest.fixture(scope="module")
def covid_run(covid_ct_md_series) -> list[tuple[Path, float]]:
    """10 consecutive slices (by position) of the real series: (path, z)."""
    items = [
        (p, float(_read(p, stop_before_pixels=True).ImagePositionPatient[2]))
        for p in covid_ct_md_series.glob("*.dcm")
    ]
    items.sort(key=lambda item: item[1])
    return items[80:90]


@pytest.fixture
def series_copy(covid_run, tmp_path) -> Path:
    folder = tmp_path / "series"
    folder.mkdir()
    for path, _ in covid_run:
        shutil.copy2(path, folder / path.name)
    return folder


def _save(ds: pydicom.Dataset, path: Path) -> None:
    with config.disable_value_validation():
        save_dataset(ds, path)


def test_copied_run_reads_cleanly(series_copy, covid_run):
    """Baseline for the cases below: the untouched 10-file copy reads with the expected geometry."""
    img = load_ct(series_copy)
    assert tuple(img.shape) == (1, 512, 512, 10) and img.meta["spacing"][2] == pytest.approx(2.0)
    assert (img.affine.numpy() @ [0, 0, 0, 1])[2] == pytest.approx(covid_run[0][1])


def test_missing_middle_slice_reports_the_gap(series_copy, covid_run):
    gone, z = covid_run[4]
    (series_copy / gone.name).unlink()
    with pytest.raises(SlicePositionError) as err:
        load_ct(series_copy)
    msg = str(err.value)
    assert msg.startswith(f"{series_copy}: missing slice(s)")
    before, after = covid_run[3], covid_run[5]
    assert (
        f"between positions {before[1]:.3f} mm ({before[0].name}) and {after[1]:.3f} mm ({after[0].name})"
        in msg
    )
    assert "expected step 2.000 mm (about 1 slice(s) missing)" in msg


def test_duplicate_slice_under_another_name(series_copy, covid_run):
    """An anonymised series (no SOPInstanceUID) with one slice written twice: the copy has identical pixels at
    the same position, so it is dropped and the note names both files (issue 15: de-duplicate, do not refuse)."""
    src = covid_run[2][0]
    before = load_ct(series_copy)
    shutil.copy2(src, series_copy / "IM9999.dcm")
    img = load_ct(series_copy)
    assert img.shape == before.shape
    np.testing.assert_array_equal(img[0].numpy(), before[0].numpy())
    notes = img.meta["input_notes"]
    assert "dropped 1 duplicate slice(s) at the same position with identical pixels" in notes
    assert src.name in notes and "IM9999.dcm" in notes


def test_exact_copy_of_an_instance_is_dropped_but_a_clash_is_not(shared_data, tmp_path, caplog):
    src = shared_data / "fixtures" / "lungmask_testdata"
    folder = tmp_path / "lm"
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.txt"))
    shutil.copy2(folder / "1.dcm", folder / "1 (copy).dcm")  # same SOPInstanceUID, same bytes
    with caplog.at_level(logging.WARNING, logger="ctcovid.io"):
        img = load_ct(folder)
    assert img.shape[-1] == 2 and "byte-identical duplicate" in img.meta["series_selection"]
    assert any("duplicate" in r.getMessage() for r in caplog.records)
    # another instance with the same pixels at the same position is a slice written twice: dropped with a note
    ds = _read(folder / "1.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    _save(ds, folder / "1 (copy).dcm")
    img = load_ct(folder)
    assert img.shape[-1] == 2 and "duplicate slice(s) at the same position" in img.meta["input_notes"]
    # one with different pixels at the same position is a real conflict
    arr = ds.pixel_array.copy()
    arr[:8] = arr.max()
    ds.PixelData = arr.tobytes()
    _save(ds, folder / "1 (copy).dcm")
    with pytest.raises(SlicePositionError, match="duplicate slice position"):
        load_ct(folder)


def test_mixed_image_sizes(series_copy, covid_run):
    odd = series_copy / covid_run[6][0].name
    ds = _read(odd)
    ds.decompress()
    small = np.ascontiguousarray(ds.pixel_array[::2, ::2])
    ds.PixelData, ds.Rows, ds.Columns = small.tobytes(), small.shape[0], small.shape[1]
    _save(ds, odd)
    with pytest.raises(InconsistentSeriesError) as err:
        load_ct(series_copy)
    assert (
        str(err.value)
        == f"{series_copy}: mixed image sizes: {odd.name} is 256x256 (rows x columns) but the series is 512x512"
    )


@pytest.mark.filterwarnings("ignore:End of file reached")
@pytest.mark.parametrize("how", ["pixel data", "header"])
def test_truncated_file(series_copy, covid_run, how):
    victim = series_copy / covid_run[5][0].name
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if how == "pixel data" else data[:400])
    with pytest.raises(CorruptFileError) as err:
        load_ct(series_copy)
    assert err.value.path == str(victim)
    assert ("pixel data cannot be decoded" if how == "pixel data" else "DICOM header is truncated") in str(
        err.value
    )


def test_series_of_non_ct_modality(series_copy):
    for path in series_copy.iterdir():
        ds = _read(path)
        ds.Modality = "MR"
        _save(ds, path)
    with pytest.raises(NoCTSeriesError, match=r"no CT image series found \(10 file\(s\) modality MR\)"):
        load_ct(series_copy)


@pytest.mark.parametrize(
    "uid, name",
    [
        ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level"),
        ("1.2.826.0.1.3680043.99.1", "unknown transfer syntax"),
    ],
)
def test_unsupported_transfer_syntax_names_syntax_and_file(series_copy, uid, name):
    victim = sorted(series_copy.iterdir())[3]
    ds = _read(victim)
    ds.file_meta.TransferSyntaxUID = uid
    _save(ds, victim)
    with pytest.raises(UnsupportedTransferSyntaxError) as err:
        load_ct(series_copy)
    assert err.value.path == str(victim)
    assert f"transfer syntax {name} ({uid}) cannot be decoded" in str(err.value)


def test_missing_decoder_plugin_names_package_to_install(series_copy, monkeypatch):
    """As if pylibjpeg-libjpeg and GDCM were not installed: the JPEG-lossless series names what to install."""
    monkeypatch.setattr(dicom_decode_module, "_SITK_DECODABLE", dicom_decode_module._UNCOMPRESSED)
    monkeypatch.setattr(
        dicom_decode_module, "_pydicom_decoder_status", lambda uid: (False, "missing decoder plugins: (test)")
    )
    with pytest.raises(
        UnsupportedTransferSyntaxError,
        match=r"JPEG Lossless.*install a decoder: pip install pylibjpeg pylibjpeg-libjpeg",
    ):
        load_ct(series_copy)


def test_stray_files_are_skipped(series_copy):
    (series_copy / "README.txt").write_text("notes")
    (series_copy / "VERSION").write_bytes(b"\x00\x01 not dicom")
    (series_copy / ".DS_Store").write_bytes(b"junk")
    assert load_ct(series_copy).shape[-1] == 10


def test_empty_and_nested_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmptyInputError, match="is empty"):
        load_ct(empty)
    (empty / "patient1").mkdir()
    with pytest.raises(EmptyInputError, match=r"1 sub-folder\(s\), which are not searched"):
        load_ct(empty)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputNotFoundError, match="does not exist") as err:
        load_ct(missing)
    assert isinstance(err.value, FileNotFoundError) and err.value.path == str(missing)


def test_nifti_with_nan_and_truncated_nifti(totalseg_dir, tmp_path):
    ref = nib.load(totalseg_dir / "example_ct_sm.nii.gz")
    data = ref.get_fdata(dtype=np.float32)[:40, :40, :6]
    data[3, 4, 5] = np.nan
    bad = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, ref.affine), bad)
    with pytest.raises(NonFiniteValuesError, match=r"nan.nii.gz: 1 of 9600 voxels are NaN or infinite"):
        load_ct(bad)

    raw = gzip.decompress((totalseg_dir / "example_ct_sm.nii.gz").read_bytes())
    cut = tmp_path / "cut.nii"
    cut.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CorruptFileError, match="NIfTI file cannot be read"):
        load_ct(cut)


def test_2d_nifti_and_single_image_need_allow_2d(totalseg_dir, tmp_path):
    from PIL import Image

    ref = nib.load(totalseg_dir / "example_ct_sm.nii.gz")
    flat = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(ref.get_fdata(dtype=np.float32)[:, :, 10:11], ref.affine), flat)
    with pytest.raises(DimensionalityError, match="is a single 2D image"):
        load_ct(flat)
    assert load_ct(flat, allow_2d=True).shape[-1] == 1

    png = tmp_path / "slice.png"
    Image.fromarray((np.arange(64 * 48) * 4095 // (64 * 48 - 1)).astype(np.uint16).reshape(48, 64)).save(png)
    with pytest.raises(DimensionalityError, match="slice.png: is a single 2D image; a CT volume is required"):
        load_ct(png)
    img = load_ct(png, allow_2d=True)
    assert tuple(img.shape) == (1, 64, 48, 1) and float(img.max()) == 4095  # 16-bit values kept


def test_slice_folder_with_mixed_sizes_or_corrupt_image(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 40), dtype=np.uint8)).save(tmp_path / f"s{k}.png")
    Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8)).save(tmp_path / "s3.png")
    with pytest.raises(
        InconsistentSeriesError, match=r"s3.png is 30x40 \(rows x columns\) but s0.png is 32x40"
    ):
        load_ct(tmp_path)
    (tmp_path / "s3.png").write_bytes((tmp_path / "s2.png").read_bytes()[:60])
    with pytest.raises(CorruptFileError, match="s3.png: image cannot be read"):
        load_ct(tmp_path)


def test_unsupported_formats(tmp_path):
    mha = tmp_path / "scan.mha"
    mha.write_bytes(b"ObjectType = Image\n")
    with pytest.raises(UnsupportedFormatError, match="'.mha' files are not read"):
        load_ct(mha)
    garbage = tmp_path / "scan.dcm"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(CorruptFileError, match="scan.dcm"):
        load_ct(garbage)


def test_chest_radiograph_dicom_is_not_ct(shared_data):
    cr = shared_data / "fixtures" / "pydicom_data_pypi" / "RG1_UNCR.dcm"
    with pytest.raises(
        NoCTSeriesError, match=r"RG1_UNCR.dcm: no CT image series found \(1 file\(s\) modality CR\)"
    ):
        load_ct(cr, allow_2d=True)
