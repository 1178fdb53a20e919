"""benchmarks/cxr_gradcam_lung_share.py: the measure of where stage 1 looks, on hand-made maps and masks."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ctcovid.bundle import bundles_root

sys.path.insert(0, str(bundles_root().parent / "benchmarks"))
from cxr_gradcam_lung_share import share_in_lung, summarise  # noqa: E402


def _lungs() -> np.ndarray:
    lung = np.zeros((20, 20), bool)
    lung[4:16, 2:8] = lung[4:16, 12:18] = True  # two lung fields, 144 of 400 pixels
    return lung


def test_map_inside_the_lungs_counts_fully():
    heat = np.zeros((20, 20), np.float32)
    heat[6:10, 3:6] = 1.0
    heat[8, 4] = 1.5
    out = share_in_lung(heat, _lungs())
    assert out == {"lung_share": 1.0, "lung_area": 0.36, "peak_in_lung": True}


def test_even_map_gives_the_lung_area_and_a_marker_peak_is_outside():
    heat = np.full((20, 20), 0.5, np.float32)
    assert share_in_lung(heat, _lungs())["lung_share"] == pytest.approx(0.36)
    heat[1, 1] = 1.0  # the film's corner (a side marker), outside both lungs
    out = share_in_lung(heat, _lungs())
    assert out["peak_in_lung"] is False and out["lung_share"] == pytest.approx(72 / 200.5, abs=1e-4)


def test_summary_skips_empty_maps():
    rows = [
        share_in_lung(np.zeros((20, 20), np.float32), _lungs()),  # no positive evidence: nothing to place
        {"lung_share": 0.8, "lung_area": 0.3, "peak_in_lung": True},
        {"lung_share": 0.4, "lung_area": 0.3, "peak_in_lung": False},
    ]
    s = summarise(rows)
    assert s["images"] == 3 and s["empty_maps"] == 1
    assert s["lung_share_mean"] == pytest.approx(0.6) and s["peak_in_lung_fraction"] == 0.5
