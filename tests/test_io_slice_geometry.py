"""Pure slice-ordering, gap-check, affine and series-choice logic (no files, synthetic headers)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from ctcovid.io.dicom_headers import DicomHeader
from ctcovid.io.dicom_series import choose_series
from ctcovid.io.errors import NoCTSeriesError, SlicePositionError, UnsupportedFormatError
from ctcovid.io.slice_geometry import (
    LPS_TO_RAS,
    check_slice_distances,
    dicom_affine_ras,
    order_slices,
    slice_normal,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _rotation(q: np.ndarray) -> np.ndarray:
    """Rotation matrix from a (non-zero) quaternion."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


quaternions = st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 0.1)


def _stack(q, n, step, origin):
    """IOP and (N, 3) IPP of a uniform stack with a random orientation."""
    rot = _rotation(np.asarray(q))
    row, col, normal = rot[:, 0], rot[:, 1], rot[:, 2]
    iop = np.concatenate([row, col])
    positions = np.asarray(origin) + np.arange(n)[:, None] * step * normal
    return iop, positions, normal


# ---------------------------------------------------------------------------- slice normal / order


def test_slice_normal_axial_coronal_sagittal():
    np.testing.assert_allclose(slice_normal(AXIAL), [0, 0, 1])
    np.testing.assert_allclose(slice_normal((1, 0, 0, 0, 0, -1)), [0, 1, 0])  # coronal: normal = +P
    np.testing.assert_allclose(slice_normal((0, 1, 0, 0, 0, -1)), [-1, 0, 0])  # sagittal


@pytest.mark.parametrize(
    "iop", [(1, 0, 0, 1, 0, 0), (0, 0, 0, 0, 0, 0), (1, 0, 0, 0, 1), (np.nan, 0, 0, 0, 1, 0)]
)
def test_slice_normal_rejects_degenerate_orientation(iop):
    with pytest.raises(ValueError):
        slice_normal(iop)


def test_order_is_by_projection_not_by_z_alone():
    # Oblique stack: z alone would order these two slices the other way round.
    normal = np.array([0.0, np.sin(1.2), np.cos(1.2)])
    positions = np.array([[0, 10.0, 0.0], [0, 0.0, 1.0]])  # projections 9.32 and 0.36
    order, dist = order_slices(positions, normal)
    assert order.tolist() == [1, 0]
    assert dist[0] < dist[1]


@settings(max_examples=60, deadline=None)
@given(
    q=quaternions,
    n=st.integers(2, 60),
    step=st.floats(0.3, 10.0),
    origin=st.lists(st.floats(-500, 500), min_size=3, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_shuffled_uniform_stack_is_ordered_and_passes(q, n, step, origin, seed):
    iop, positions, normal = _stack(q, n, step, origin)
    perm = np.random.default_rng(seed).permutation(n)
    order, dist = order_slices(positions[perm], slice_normal(iop))
    assert perm[order].tolist() == list(range(n))  # original stack order recovered
    assert check_slice_distances(dist) == pytest.approx(step, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    q=quaternions,
    n=st.integers(4, 60),
    step=st.floats(0.3, 10.0),
    data=st.data(),
)
def test_removed_slice_is_reported_with_its_gap(q, n, step, data):
    iop, positions, normal = _stack(q, n, step, (10.0, -20.0, 30.0))
    gone = data.draw(st.integers(1, n - 2))
    kept = np.delete(positions, gone, axis=0)
    labels = [f"f{i}" for i in range(n) if i != gone]
    order, dist = order_slices(kept, slice_normal(iop))
    with pytest.raises(SlicePositionError) as err:
        check_slice_distances(dist, labels=[labels[i] for i in order], source="series")
    msg = str(err.value)
    assert "missing slice" in msg and "about 1 slice(s) missing" in msg
    before, after = float(positions[gone - 1] @ normal), float(positions[gone + 1] @ normal)
    assert f"{before:.3f} mm (f{gone - 1})" in msg and f"{after:.3f} mm (f{gone + 1})" in msg
    assert f"expected step {step:.3f} mm" in msg
    assert msg.startswith("series: ")


@settings(max_examples=40, deadline=None)
@given(q=quaternions, n=st.integers(2, 40), step=st.floats(0.3, 10.0), data=st.data())
def test_duplicated_slice_is_reported(q, n, step, data):
    iop, positions, _ = _stack(q, n, step, (0.0, 0.0, 0.0))
    dup = data.draw(st.integers(0, n - 1))
    stacked = np.vstack([positions, positions[dup : dup + 1]])
    _, dist = order_slices(stacked, slice_normal(iop))
    with pytest.raises(SlicePositionError, match="duplicate slice position"):
        check_slice_distances(dist)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 80), step=st.floats(0.5, 5.0), seed=st.integers(0, 2**32 - 1))
def test_rounding_noise_is_tolerated(n, step, seed):
    noise = np.random.default_rng(seed).uniform(-0.01, 0.01, n) * step  # +-1 % of the step
    dist = np.arange(n) * step + noise
    assert check_slice_distances(dist) == pytest.approx(step, rel=0.03)


def test_several_missing_slices_and_non_uniform_step_messages():
    with pytest.raises(SlicePositionError, match=r"gap of 6.000 mm .*about 2 slice\(s\) missing"):
        check_slice_distances([0, 2, 4, 10, 12])
    with pytest.raises(
        SlicePositionError, match=r"non-uniform slice step: 3.000 mm .* expected step 2.000 mm"
    ):
        check_slice_distances([0, 2, 4, 7, 9])
    assert check_slice_distances([5.0]) is None


def test_check_slice_distances_rejects_unsorted_input():
    with pytest.raises(ValueError, match="sorted"):
        check_slice_distances([0, 2, 1])


# ---------------------------------------------------------------------------- affine


@pytest.mark.parametrize(
    "iop",
    [
        AXIAL,
        (1, 0, 0, 0, 0, -1),
        (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
        (0.8660254, 0.5, 0.0, -0.5, 0.8660254, 0.0),
    ],
)
def test_affine_matches_simpleitk_index_to_physical(iop):
    """Independent check: SimpleITK's index -> LPS point, flipped to RAS, equals our affine."""
    ipp, spacing, step = (-120.5, 33.0, -400.25), (0.7, 0.8), 2.5  # PixelSpacing = (row, column) spacing
    normal = slice_normal(iop)
    affine = dicom_affine_ras(ipp, iop, spacing, normal * step)
    img = sitk.Image(8, 8, 8, sitk.sitkUInt8)
    img.SetOrigin(ipp)
    img.SetSpacing((spacing[1], spacing[0], step))  # ITK: (x = along rows i.e. column spacing, y, z)
    img.SetDirection(tuple(np.column_stack([iop[:3], iop[3:], normal]).ravel()))
    for idx in [(0, 0, 0), (3, 5, 7), (7, 1, 2)]:
        lps = np.asarray(img.TransformIndexToPhysicalPoint(idx))
        ras = (affine @ np.array([*idx, 1.0]))[:3]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)
    np.testing.assert_allclose(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4))


# ---------------------------------------------------------------------------- series choice


def _h(i: int, series: str = "S1", **kw) -> DicomHeader:
    base = dict(
        path=f"/scan/{series}_{i:03d}.dcm",
        series_uid=series,
        sop_uid=f"{series}.{i}",
        modality="CT",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        rows=512,
        columns=512,
        position=(0.0, 0.0, 2.0 * i),
        orientation=AXIAL,
        pixel_spacing=(0.7, 0.7),
        slice_thickness=2.0,
        transfer_syntax="1.2.840.10008.1.2.1",
        samples_per_pixel=1,
        frames=1,
        has_rescale=True,
        series_description=f"desc {series}",
        series_number=int(series[1:]) if series[1:].isdigit() else None,
    )
    base.update(kw)
    return DicomHeader(**base)


def test_choose_series_takes_most_slices_and_says_why(caplog):
    headers = [_h(i, "S1") for i in range(5)] + [_h(i, "S2") for i in range(9)]
    headers.append(_h(0, "S3", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    headers += [_h(i, "S4", modality="PT") for i in range(20)]
    with caplog.at_level(logging.INFO, logger="ctcovid.io.dicom_series"):
        chosen, note = choose_series(headers, "/scan")
    assert {h.series_uid for h in chosen} == {"S2"} and len(chosen) == 9
    assert "the most slices" in note and "S1" in note
    assert "20 modality PT" in note and "1 localizer" in note
    assert any("chose series" in r.getMessage() for r in caplog.records)


def test_choose_series_prefers_original_over_derived():
    headers = [_h(i, "S1") for i in range(5)] + [
        _h(i, "S2", image_type=("DERIVED", "SECONDARY")) for i in range(30)
    ]
    chosen, note = choose_series(headers, "/scan")
    assert chosen[0].series_uid == "S1"
    assert "not ORIGINAL/PRIMARY" in note
    # with no original series left, the derived one is used (with a note)
    chosen, note = choose_series(headers[5:], "/scan")
    assert chosen[0].series_uid == "S2" and "derived" in note


def test_choose_series_accepts_missing_modality_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        chosen, note = choose_series([_h(i, modality=None, image_type=()) for i in range(2)], "/scan")
    assert len(chosen) == 2 and "Modality tag missing" in note
    assert any("no Modality" in r.getMessage() for r in caplog.records)


def test_choose_series_without_ct_raises_listing_what_was_found():
    headers = [_h(i, modality="MR") for i in range(4)] + [
        _h(9, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    ]
    with pytest.raises(
        NoCTSeriesError, match=re.escape("/scan: no CT image series found (4 file(s) modality MR")
    ):
        choose_series(headers, "/scan")
    with pytest.raises(UnsupportedFormatError, match="multi-frame"):
        choose_series([_h(0, frames=40)], "/scan")
