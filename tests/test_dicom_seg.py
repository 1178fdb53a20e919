"""DICOM SEG output for DICOM inputs: it reads back equal to the NIfTI mask, references its source series, and
a series whose export dropped the UIDs a SEG needs gets none, with the reason in the record.

The real series (COVID-CT-MD normal002) is anonymised without SOPInstanceUIDs or a frame of reference, as
some PACS exports are; a copy with those UIDs filled in (pixels and geometry untouched) stands for a
complete export.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from ctcovid.io.errors import CTInputError

hd = pytest.importorskip("highdicom", reason="highdicom writes the DICOM SEG output")


@pytest.fixture(scope="module")
def complete_series(tmp_path_factory, covid_ct_md_series) -> tuple[Path, dict]:
    """normal002 with the UIDs its export dropped: every file's own SOP instance, one study, series and
    frame of reference."""
    uids = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid()}
    folder = tmp_path_factory.mktemp("complete") / "normal002_complete"
    folder.mkdir()
    for f in sorted(covid_ct_md_series.iterdir()):
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in uids.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / f.name)
    return folder, uids


@pytest.fixture(scope="module")
def seg_run(seg_only_bundles, complete_series, covid_ct_md_series, tmp_path_factory) -> Path:
    from ctcovid.ct import CTCovidPipeline
    from ctcovid.running import run_batch

    out = tmp_path_factory.mktemp("seg_out")
    pipeline = CTCovidPipeline(bundle_dir=seg_only_bundles, device="cpu", gradcam=False)
    report = run_batch([covid_ct_md_series, complete_series[0]], out, pipeline, progress=False)
    assert [r["status"] for r in report.rows] == ["ok", "ok"]
    return out


def test_dicom_seg_reads_back_equal_to_the_nifti_mask(seg_run, complete_series):
    import nibabel as nib

    from ctcovid.io.ct import dicom_series_files

    folder, uids = complete_series
    record = json.loads((seg_run / "normal002_complete.json").read_text())
    assert record["outputs"]["dicom_seg"] == "normal002_complete_seg.dcm" and record["output_notes"] == {}
    seg = hd.seg.segread(seg_run / "normal002_complete_seg.dcm")
    files = dicom_series_files(folder)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources],
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )  # (slices, rows, columns, 1), slices in the series' order
    from_seg = frames[..., 0].transpose(2, 1, 0) > 0
    nifti = np.asarray(nib.load(seg_run / "normal002_complete_lung_mask.nii.gz").dataobj) > 0
    assert from_seg.shape == nifti.shape == (512, 512, 167)
    assert nifti.sum() > 100_000 and np.array_equal(from_seg, nifti)  # voxel for voxel

    # it references the source series and shares its frame of reference and study
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == uids["StudyInstanceUID"]
    assert seg.FrameOfReferenceUID == uids["FrameOfReferenceUID"]
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [uids["SeriesInstanceUID"]]
    assert seg.SeriesInstanceUID != uids["SeriesInstanceUID"]  # a new series of its own
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "lung"), (2, "infection")]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"  # SCT lung
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SCT lesion
    lesions = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources],
        segment_numbers=[2],
        assert_missing_frames_are_empty=True,
    )[..., 0].transpose(2, 1, 0) > 0
    nifti_lesions = np.asarray(nib.load(seg_run / "normal002_complete_infection_mask.nii.gz").dataobj) > 0
    assert np.array_equal(lesions, nifti_lesions)
    # each stored frame sits where its source slice is (viewers place a SEG by position)
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    for group in seg.PerFrameFunctionalGroupsSequence[:5]:
        source = by_uid[group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        position = group.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(v) for v in position], [float(v) for v in source.ImagePositionPatient])


def test_series_without_the_uids_gets_no_seg_and_says_why(seg_run):
    record = json.loads((seg_run / "normal002.json").read_text())
    assert "dicom_seg" not in record["outputs"] and record["outputs"]["lung_mask"] == "normal002_lung_mask.nii.gz"
    note = record["output_notes"]["dicom_seg"]
    assert note.startswith("not written: ") and "normal002" in note and "no SOPInstanceUID" in note
    assert not list(seg_run.glob("normal002_seg*")) and not list(seg_run.glob(".*"))  # nothing half-written


def test_mask_that_does_not_fit_the_series_is_refused(complete_series, tmp_path):
    from ctcovid.io.ct import dicom_series_files
    from ctcovid.io.dicom_seg import write_dicom_seg

    files = dicom_series_files(complete_series[0])
    with pytest.raises(CTInputError, match=r"lung mask \(512, 512, 10\) does not fit the series"):
        write_dicom_seg({"lung": np.ones((512, 512, 10), np.uint8)}, files, tmp_path / "x_seg.dcm")
    assert list(tmp_path.iterdir()) == []


def _seg_segment(seg_path: Path, files, segment: int) -> np.ndarray:
    """Segment ``segment`` of a SEG as an (X, Y, Z) bool array on the grid of ``files`` (slice order)."""
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    frames = hd.seg.segread(seg_path).get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources],
        segment_numbers=[segment],
        assert_missing_frames_are_empty=True,
    )
    return frames[..., 0].transpose(2, 1, 0) > 0


@pytest.fixture(scope="module")
def assigned_run(seg_only_bundles, covid_ct_md_series, tmp_path_factory) -> Path:
    """``ctcovid predict --assign-dicom-uids`` on normal002 as shared (no SOPInstanceUIDs, no frame of reference)."""
    from ctcovid.cli.main import main

    out = tmp_path_factory.mktemp("assigned")
    argv = ["predict", str(covid_ct_md_series), "--out", str(out), "--bundle-dir", str(seg_only_bundles),
            "--device", "cpu", "--no-gradcam", "--no-progress"]  # fmt: skip
    assert main(argv) == 0 and not (out / "normal002_seg.dcm").exists()  # without the option: no SEG
    assert main([*argv, "--assign-dicom-uids"]) == 0  # the option changes the result: recomputed, not reused
    return out


def test_series_without_uids_gets_a_seg_against_a_copy_with_assigned_uids(assigned_run, covid_ct_md_series):
    """The issue's case: ``ctcovid predict`` on normal002 writes a SEG that reads back equal to the NIfTI masks,
    referencing normal002_dicom/, a copy whose pixels and geometry are the source's."""
    import nibabel as nib

    from ctcovid.io.ct import dicom_series_files

    record = json.loads((assigned_run / "normal002.json").read_text())
    assert record["outputs"]["dicom_seg"] == "normal002_seg.dcm"
    assert record["outputs"]["dicom_series"] == "normal002_dicom"
    assert "normal002_dicom/" in record["output_notes"]["dicom_seg"] and "no SOPInstanceUID" in record["output_notes"]["dicom_seg"]
    copy_files = dicom_series_files(assigned_run / "normal002_dicom")
    source_files = dicom_series_files(covid_ct_md_series)
    assert [Path(f).name for f in copy_files] == [Path(f).name for f in source_files]  # same slices, same order
    for segment, name in ((1, "lung"), (2, "infection")):
        nifti = np.asarray(nib.load(assigned_run / f"normal002_{name}_mask.nii.gz").dataobj) > 0
        from_seg = _seg_segment(assigned_run / "normal002_seg.dcm", copy_files, segment)
        assert from_seg.shape == nifti.shape == (512, 512, 167) and np.array_equal(from_seg, nifti)  # voxel for voxel
        assert nifti.sum() > (100_000 if name == "lung" else 0)
    seg = hd.seg.segread(assigned_run / "normal002_seg.dcm")
    first = pydicom.dcmread(copy_files[0])
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID and seg.StudyInstanceUID == first.StudyInstanceUID
    original = pydicom.dcmread(source_files[0])
    assert first.PixelData == original.PixelData and first.ImagePositionPatient == original.ImagePositionPatient
    assert first.PatientID == original.PatientID == "normal002"
    assert not list(assigned_run.glob(".*"))  # no temporary file or folder left


def test_assigned_uids_are_valid_deterministic_and_keep_valid_ones(totalseg_dir, tmp_path):
    """TotalSegmentator's DICOM export has no SOP instance, series or study UID in its datasets but a valid frame
    of reference: the copy gets the missing ones, the same on a re-run, and keeps the valid one."""
    from pydicom.uid import UID

    from ctcovid.io.dicom_uids import copy_with_assigned_uids, missing_uid

    files = sorted((totalseg_dir / "example_ct_dicom").iterdir())
    originals = [pydicom.dcmread(f) for f in files]
    assert missing_uid(originals[0]) == "no SOPInstanceUID"
    first = copy_with_assigned_uids(files, tmp_path / "copy")
    keys = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
    uids1 = [tuple(d.get(k) for k in keys) for d in map(pydicom.dcmread, first)]
    second = copy_with_assigned_uids(files, tmp_path / "copy")  # replaces the earlier copy
    uids2 = [tuple(d.get(k) for k in keys) for d in map(pydicom.dcmread, second)]
    assert uids1 == uids2  # a re-run assigns the same UIDs
    assert len({u[0] for u in uids1}) == len(files)  # one SOP instance per file
    assert all(len({u[i] for u in uids1}) == 1 for i in (1, 2, 3))  # one series, study, frame of reference
    for path, orig in zip(second, originals):
        ds = pydicom.dcmread(path)
        assert missing_uid(ds) is None and all(UID(ds.get(k)).is_valid for k in keys)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.FrameOfReferenceUID == orig.FrameOfReferenceUID  # valid: kept
        assert ds.PixelData == orig.PixelData and ds.ImagePositionPatient == orig.ImagePositionPatient
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temporary folders left
