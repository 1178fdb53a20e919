"""Lung involvement, left/right lungs, the lung hull and the CT-0..CT-4 grade (ctcovid.ct.involvement),
and the montage's choice of lesion slices: on masks made so the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from ctcovid.ct.involvement import (
    ct_severity_grade,
    involvement_percent,
    lesions_beyond_lung,
    lung_hull,
    per_lung_voxels,
    split_lungs,
)
from ctcovid.ct.montage import pick_montage_slices


@pytest.mark.parametrize(
    "percent, found, grade",
    [
        (0.0, False, "CT-0"),
        (30.0, False, "CT-0"),  # no lesion counted: CT-0 whatever the percent says
        (0.01, True, "CT-1"),
        (24.999, True, "CT-1"),
        (25.0, True, "CT-2"),
        (49.99, True, "CT-2"),
        (50.0, True, "CT-3"),
        (74.99, True, "CT-3"),
        (75.0, True, "CT-4"),
        (100.0, True, "CT-4"),
        (None, True, None),
    ],
)
def test_grade_follows_mosmed_bounds(percent, found, grade):
    assert ct_severity_grade(percent, found) == grade


def test_involvement_counts_only_infection_inside_the_lung():
    lung = np.zeros((10, 10, 2), bool)
    lung[:5] = True  # 100 voxels
    inf = np.zeros_like(lung)
    inf[3:7, :, 0] = True  # 20 inside the lung, 20 outside
    assert involvement_percent(inf, lung) == pytest.approx(20.0)
    assert involvement_percent(inf, np.zeros_like(lung)) is None


def _two_lungs(shape=(60, 40, 8), touching=False):
    """Right lung (larger) at low voxel x, left lung at high x; a gap of 10 columns unless ``touching``."""
    m = np.zeros(shape, np.uint8)
    m[5:28, 5:35] = 1
    m[38 if not touching else 28 : 55, 8:32] = 1
    return m


@pytest.mark.parametrize("touching", [False, True])
def test_split_lungs_uses_the_affine_to_name_the_sides(touching):
    m = _two_lungs(touching=touching)
    low_x = np.zeros_like(m, bool)
    low_x[:30] = True  # the larger block (voxel x 5..27) and nothing of the other
    # RAS affine with voxel x running to the patient's LEFT (world x decreasing): low voxel x = right lung
    flip = np.diag([-0.7, 0.7, 5.0, 1.0])
    right, left = split_lungs(m, flip)
    assert np.array_equal(right, (m > 0) & low_x)
    assert np.array_equal(left, (m > 0) & ~low_x)
    # the same voxels with x running to the patient's right swap names
    right2, left2 = split_lungs(m, np.diag([0.7, 0.7, 5.0, 1.0]))
    assert np.array_equal(right2, left) and np.array_equal(left2, right)


def test_split_lungs_follows_a_rotated_axis():
    """An affine whose voxel axis 1 (not 0) runs left-right (a transposed slice): the split follows it."""
    m = np.transpose(_two_lungs(), (1, 0, 2))  # sides now along voxel axis 1
    a = np.zeros((4, 4))
    a[0, 1], a[1, 0], a[2, 2], a[3, 3] = 0.7, 0.7, 5.0, 1.0  # voxel y -> world x (to the right)
    right, left = split_lungs(m, a)
    assert right.sum() == int(m[:, 30:].sum()) and left.sum() == int(m[:, :30].sum())


@pytest.mark.parametrize("touching", [False, True])
def test_per_lung_counts_are_the_split_masks_counts(touching):
    """per_lung_voxels (the pipeline's per-lung numbers, counted inside the box) equals counting
    split_lungs' whole-volume masks, including infection outside the lungs (not counted) and an empty mask."""
    m = _two_lungs(touching=touching)
    rng = np.random.default_rng(5)
    inf = rng.random(m.shape) < 0.2  # lesions everywhere, also outside the lungs
    a = np.diag([-0.7, 0.7, 5.0, 1.0])
    right, left = split_lungs(m, a)
    expected = {
        "right": (int(right.sum()), int((right & inf).sum())),
        "left": (int(left.sum()), int((left & inf).sum())),
    }
    assert per_lung_voxels(m, inf.astype(np.uint8), a) == expected
    assert expected["right"][1] > 0 and expected["left"][1] > 0
    assert per_lung_voxels(np.zeros_like(m), inf, a) == {"right": (0, 0), "left": (0, 0)}


def test_small_components_go_to_the_side_they_lie_on():
    m = _two_lungs()
    m[58, 20, 3] = 1  # a stray voxel beyond the high-x lung
    right, left = split_lungs(m, np.diag([0.7, 0.7, 5.0, 1.0]))  # high x = patient right
    assert right[58, 20, 3] and not left[58, 20, 3]


def test_lung_hull_fills_a_notch_but_not_the_gap_between_lungs():
    m = _two_lungs()
    notch = np.zeros_like(m, bool)
    notch[5:12, 15:25, 4] = True  # consolidation cut out of one lung at its outer edge (x = 5)
    m[notch] = 0
    hull = lung_hull(m)
    assert hull[notch].all()  # the notch lies inside the lung's outline again
    assert not hull[30:37].any()  # nothing between the lungs
    assert np.array_equal(hull[:, :, 0], m[:, :, 0] > 0)  # rectangles are their own hulls
    empty = np.zeros_like(m)
    assert not lung_hull(empty).any()


def test_lesion_straddling_the_lung_edge_is_kept_whole():
    """A consolidation against the chest wall pushed the aerated lung (and its hull) back: a lesion mostly inside
    the lung's outline counts whole; one mostly outside only where the hull reaches; one apart from it not."""
    yy, xx = np.mgrid[:80, :80]
    lung = (yy - 40) ** 2 + (xx - 40) ** 2 <= 25**2  # a round lung, x 15..65
    straddling = (np.abs(yy - 40) <= 6) & (xx >= 50) & (xx <= 70)  # x 50..70: 16 of 21 columns inside
    mostly_out = (np.abs(yy - 20) <= 2) & (xx >= 52) & (xx <= 75)  # reaches the lung at its edge only
    apart = (np.abs(yy - 70) <= 2) & (xx >= 5) & (xx <= 10)
    found = straddling | mostly_out | apart
    added = lesions_beyond_lung(found, lung)
    assert not (added & lung).any()  # only what lies beyond the mask
    np.testing.assert_array_equal(added & straddling, straddling & ~lung)  # the straddling lesion, whole
    hull_part = mostly_out & ~lung & lung_hull(lung[:, :, None])[:, :, 0]
    np.testing.assert_array_equal(added & mostly_out, hull_part)  # its hull part only, not the rest
    assert np.count_nonzero(hull_part) < np.count_nonzero(mostly_out & ~lung)
    assert not (added & apart).any()


def test_montage_picks_lesion_slices_and_keeps_context():
    kept = list(range(10, 70))
    area = [0] * 60
    for i, a in ((5, 50), (33, 900), (34, 800), (58, 10)):
        area[i] = a
    picked = pick_montage_slices(kept, max_tiles=8, lesion_area=area)
    assert len(picked) == 8 and picked == sorted(picked)
    assert {15, 43, 44, 68} <= set(picked)  # every slice with lesion (4 <= 8 // 2)
    assert picked[0] == 10 and picked[-1] == 69  # still spans the lungs
    assert pick_montage_slices(kept, max_tiles=8) == pick_montage_slices(kept, 8, lesion_area=[0] * 60)


@pytest.mark.parametrize("kept", [[2, 3, 4, 5, 6, 7, 8], [2, 3, 4, 6, 7, 8]], ids=["consecutive", "gap"])
def test_lesion_stage_measure_matches_whole_volume_arithmetic(kept):
    """InfectionSegmentationStage.measure works slice by slice on views (memory, issue 15); it must give what
    the plain whole-volume formulas give, for consecutive kept slices (views) and a gap (copies): lesions
    outside the kept slices ignored, a lesion in a notch of the lung outline added to both masks."""
    from ctcovid.ct.result import CTResult
    from ctcovid.ct.stages.infection import InfectionSegmentationStage

    lung = np.zeros((40, 30, 12), np.uint8)
    lung[4:16, 5:25, 2:10] = 1  # patient's left (small x) ...
    lung[22:36, 5:25, 2:10] = 1  # ... and right lung
    lung[4:8, 12:18, 3] = 0  # a notch at the outer edge of one lung on slice 3
    found_full = np.zeros_like(lung)
    found_full[4:10, 10:20, 3] = 1  # lesion filling the notch and reaching into the lung
    found_full[25:30, 8:12, 5:8] = 1  # lesion in the right lung (slice 5 may be dropped)
    found_full[0:3, 0:3, 4] = 1  # outside any lung: never counted
    res = CTResult(scan_id="t", path="t")
    res.lung_mask, res.spacing_mm, res.affine = lung.copy(), [1.0, 1.0, 2.0], np.diag([1.0, 1.0, 2.0, 1.0])
    res.spacing_known = True
    stage = InfectionSegmentationStage()
    stage.min_involvement = 0.0
    stage.measure(res, found_full[:, :, kept].copy(), kept)

    kept_lung = np.zeros(lung.shape, bool)
    kept_lung[:, :, kept] = lung[:, :, kept] > 0
    found = np.zeros(lung.shape, bool)
    found[:, :, kept] = found_full[:, :, kept] > 0
    hull = np.zeros(lung.shape, bool)
    hull[:, :, kept] = lung_hull(kept_lung[:, :, kept])
    added = found & ~kept_lung & hull
    infection = (found & kept_lung) | added
    assert added.sum() > 0 and found_full[:, :, 5].any()
    np.testing.assert_array_equal(res.infection_mask, infection.astype(np.uint8))
    np.testing.assert_array_equal(res.lung_mask > 0, (lung > 0) | added)
    assert res.lung_mask_added_voxels == added.sum()
    lung_after = (lung > 0) | added
    assert res.lung_involvement_percent == pytest.approx(100 * infection.sum() / lung_after.sum())
    right, left = split_lungs(lung_after, res.affine)
    assert res.lungs["right"]["infection_volume_ml"] == pytest.approx((infection & right).sum() * 2 / 1000)
    assert res.lungs["left"]["volume_ml"] == pytest.approx(left.sum() * 2 / 1000)
