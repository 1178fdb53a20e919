"""The background SimpleITK decode that overlaps the header checks (``ctcovid.io.dicom_prefetch``).

Its pixels must be exactly those of the checked series in the checked order whatever the file names'
order, and it must hand over nothing (the reader then decodes the series itself) when it decoded other
files; a refused series leaves no decoding thread behind.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest

import ctcovid.io.dicom_decode as dicom_decode
from ctcovid.io import load_ct
from ctcovid.io.ct_volume import c_order_xyz
from ctcovid.io.errors import SlicePositionError

logging.getLogger("pydicom").setLevel(logging.ERROR)


@pytest.fixture
def handed_over(monkeypatch) -> list[bool]:
    """Records, per read, whether the prefetch handed pixels over (True) or the series was decoded again."""
    calls: list[bool] = []
    real_take = dicom_decode.SeriesPrefetch.take

    def take(self, headers):
        out = real_take(self, headers)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(dicom_decode.SeriesPrefetch, "take", take)
    return calls


@pytest.fixture(scope="module")
def reference(totalseg_dir) -> np.ndarray:
    """The TotalSegmentator DICOM series decoded by pydicom, file by file (no prefetch involved)."""
    return load_ct(totalseg_dir / "example_ct_dicom", backend="pydicom")[0].numpy()


def _renamed_copy(src: Path, dst: Path, order: list[int]) -> Path:
    """Copy the series with file names that sort in ``order`` of the original sorted files."""
    files = sorted(p for p in src.iterdir() if p.is_file())
    dst.mkdir()
    for rank, i in enumerate(order):
        shutil.copy(files[i], dst / f"slice{rank:03d}.dcm")
    return dst


@pytest.mark.parametrize("name_order", ["as_stored", "reversed", "shuffled"])
def test_prefetched_pixels_are_the_checked_series_in_position_order(
    totalseg_dir, reference, tmp_path, handed_over, name_order
):
    n = len([p for p in (totalseg_dir / "example_ct_dicom").iterdir() if p.is_file()])
    order = {
        "as_stored": list(range(n)),
        "reversed": list(range(n))[::-1],
        "shuffled": list(np.random.default_rng(0).permutation(n)),
    }[name_order]
    folder = _renamed_copy(totalseg_dir / "example_ct_dicom", tmp_path / name_order, order)
    vol = load_ct(folder, backend="sitk")
    assert handed_over == [True]
    assert vol.shape[1:] == reference.shape
    np.testing.assert_array_equal(vol[0].numpy(), reference)
    assert vol[0].numpy().flags.c_contiguous


def test_other_files_in_the_folder_make_it_decode_the_series_itself(
    totalseg_dir, shared_data, reference, tmp_path, handed_over
):
    """A 128x128 CT of another patient next to the series: the name-order stack cannot be decoded as one volume,
    so nothing is handed over and the chosen series is decoded on its own, unchanged."""
    folder = tmp_path / "mixed"
    shutil.copytree(totalseg_dir / "example_ct_dicom", folder)
    shutil.copy(shared_data / "fixtures" / "pydicom_bundled" / "CT_small.dcm", folder / "0000_other.dcm")
    vol = load_ct(folder, backend="sitk")
    assert handed_over == [False]
    np.testing.assert_array_equal(vol[0].numpy(), reference)
    assert "other series" in vol.meta["series_selection"]


def test_a_study_folder_with_several_series_is_not_decoded_ahead(totalseg_dir, reference, tmp_path, monkeypatch):
    """First and last files of different series (a study folder): nothing is decoded ahead (it would decode every
    series), and the chosen series reads as on its own."""
    from pydicom.uid import generate_uid

    decoded: list[int] = []
    real_decode = dicom_decode.SeriesPrefetch._decode

    def spy(self, sitk):
        real_decode(self, sitk)
        decoded.append(self._image is not None)

    monkeypatch.setattr(dicom_decode.SeriesPrefetch, "_decode", spy)
    folder = tmp_path / "study"
    folder.mkdir()
    files = sorted((totalseg_dir / "example_ct_dicom").iterdir())
    for i, f in enumerate(files):
        shutil.copy(f, folder / f"a_{i:03d}.dcm")
    other = generate_uid()
    for i, f in enumerate(files[:10]):  # a shorter second series: the first one is chosen
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = other
        ds.save_as(folder / f"b_{i:03d}.dcm")
    vol = load_ct(folder, backend="sitk")
    assert decoded == [False]
    np.testing.assert_array_equal(vol[0].numpy(), reference)


def test_a_refused_series_leaves_no_decoding_thread(totalseg_dir, tmp_path):
    folder = tmp_path / "gap"
    shutil.copytree(totalseg_dir / "example_ct_dicom", folder)
    files = sorted(
        folder.iterdir(),
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    files[len(files) // 2].unlink()  # a missing slice in the middle: the geometry check refuses the series
    with pytest.raises(SlicePositionError):
        load_ct(folder)
    assert not [t for t in threading.enumerate() if t.name == "ctcovid-dicom-prefetch"]


def test_pydicom_backend_does_not_prefetch(totalseg_dir, handed_over, reference):
    vol = load_ct(totalseg_dir / "example_ct_dicom", backend="pydicom")
    assert handed_over == []
    np.testing.assert_array_equal(vol[0].numpy(), reference)


@pytest.mark.parametrize("slice_order", ["forward", "reversed", "permuted"])
def test_c_order_copy_of_slice_stacks_in_any_order(slice_order):
    rng = np.random.default_rng(1)
    stack = rng.normal(size=(37, 70, 53)).astype(np.float32)  # (Z, Y, X); 37 and 70 not multiples of a tile
    view = {"forward": stack, "reversed": stack[::-1], "permuted": stack[rng.permutation(37)]}[slice_order]
    xyz = view.transpose(2, 1, 0)
    out = c_order_xyz(xyz, tile=16)
    assert out.flags.c_contiguous and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.ascontiguousarray(xyz))
    big = np.repeat(view, 40, axis=0)  # over 4 M voxels: copied in two threads
    np.testing.assert_array_equal(
        c_order_xyz(big.transpose(2, 1, 0)), np.ascontiguousarray(big.transpose(2, 1, 0))
    )
