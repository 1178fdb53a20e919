"""Intensity normalisation: lung window (HU), robust percentiles (display), dispatch by domain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor

from ctcovid.transforms import (
    NORMALIZATION_META_KEY,
    LungWindow,
    LungWindowd,
    NormalizeCTIntensity,
    NormalizeCTIntensityd,
    RobustDisplayScaling,
    RobustDisplayScalingd,
)


def _meta_tensor(values, domain: str) -> MetaTensor:
    affine = torch.diag(torch.tensor([-0.7, -0.7, 2.0, 1.0], dtype=torch.float64))
    return MetaTensor(
        torch.as_tensor(values, dtype=torch.float32),
        affine=affine,
        meta={"intensity_domain": domain, "filename_or_obj": "/scan/x"},
    )


def _fov_volume(seed: int = 0) -> np.ndarray:
    """(1, 40, 40, 6) display-like volume: 0 outside a circular FOV, 1000..3000 inside, a few 4095 outliers."""
    rng = np.random.default_rng(seed)
    vol = rng.uniform(1000, 3000, (1, 40, 40, 6)).astype(np.float32)
    yy, xx = np.mgrid[:40, :40]
    vol[0][(yy - 19.5) ** 2 + (xx - 19.5) ** 2 > 18**2] = 0
    vol[0, 20, 20, :] = 4095
    return vol


# ---------------------------------------------------------------------------- lung window


def test_lung_window_maps_hu_landmarks():
    hu = torch.tensor([-2000.0, -1350.0, -1000.0, -600.0, 0.0, 150.0, 3000.0])
    out = LungWindow()(hu)
    expected = np.clip((hu.numpy() + 1350) / 1500, 0, 1)  # window -1350..150
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    assert out[2] == pytest.approx(350 / 1500)  # air: 0.2333
    assert out[4] == pytest.approx(0.9)  # water
    assert out.dtype == torch.float32


def test_lung_window_custom_window_and_validation():
    out = LungWindow(center=-500, width=1000)(np.array([-1000.0, -500.0, 0.0]))
    np.testing.assert_allclose(np.asarray(out), [0.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        LungWindow(width=0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-4000, 4000, allow_nan=False), min_size=2, max_size=200))
def test_lung_window_is_monotonic_and_bounded(values):
    hu = np.sort(np.asarray(values, dtype=np.float32))
    out = np.asarray(LungWindow()(hu))
    assert np.all(np.diff(out) >= 0) and out.min() >= 0 and out.max() <= 1


def test_lung_window_keeps_meta_and_does_not_touch_input():
    img = _meta_tensor(np.full((1, 4, 4, 2), -1000.0), "hu")
    out = LungWindow()(img)
    assert isinstance(out, MetaTensor)
    assert torch.equal(out.affine, img.affine) and out.meta["filename_or_obj"] == "/scan/x"
    assert out.meta[NORMALIZATION_META_KEY] == "lung_window(-1350,150)"
    assert NORMALIZATION_META_KEY not in img.meta and float(img.max()) == -1000.0


# ---------------------------------------------------------------------------- robust display scaling


def test_robust_scaling_uses_percentiles_of_nonzero_voxels_and_clips():
    vol = _fov_volume()
    t = RobustDisplayScaling()
    lo, hi = t.percentiles(vol)
    inside = vol[vol != 0]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(inside, [0.5, 99.5])), rel=1e-5)
    out = np.asarray(t(vol))
    np.testing.assert_allclose(out, np.clip((vol - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert out[vol == 0].max() == 0.0 and out[0, 20, 20, 0] == 1.0  # fill -> 0, outliers clipped to 1
    assert 0.003 < np.mean(out[vol != 0] == 0.0) < 0.008  # ~0.5 % of the FOV clipped low


def test_robust_scaling_without_ignore_zeros_counts_the_fill():
    vol = _fov_volume()
    lo, _ = RobustDisplayScaling(ignore_zeros=False).percentiles(vol)
    assert lo == 0.0  # the ~20 % zeros outside the FOV set the lower percentile


def test_robust_scaling_monotonic_8bit_and_constant_volume():
    img = np.arange(256, dtype=np.float32).reshape(1, 16, 16, 1)
    out = np.asarray(RobustDisplayScaling(lower=1, upper=99)(img)).ravel()
    assert np.all(np.diff(out) >= 0) and out[0] == 0 and out[-1] == 1
    with pytest.warns(UserWarning, match="constant intensity"):
        flat = RobustDisplayScaling()(np.full((1, 4, 4, 2), 7.0, dtype=np.float32))
    assert float(torch.as_tensor(flat).abs().max()) == 0.0
    with pytest.raises(ValueError):
        RobustDisplayScaling(lower=60, upper=40)


# ---------------------------------------------------------------------------- dispatch by domain


def test_normalize_dispatches_on_meta_domain():
    hu = _meta_tensor(np.linspace(-1200, 400, 64, dtype=np.float32).reshape(1, 4, 4, 4), "hu")
    disp = _meta_tensor(_fov_volume(), "display")
    norm = NormalizeCTIntensity()
    torch.testing.assert_close(norm(hu).as_tensor(), LungWindow()(hu).as_tensor())
    torch.testing.assert_close(norm(disp).as_tensor(), RobustDisplayScaling()(disp).as_tensor())
    assert norm(disp).meta[NORMALIZATION_META_KEY].startswith("percentiles(0.5,99.5)")


def test_normalize_explicit_domain_and_errors():
    plain = torch.linspace(-1000, 0, 8).reshape(1, 2, 2, 2)
    torch.testing.assert_close(
        torch.as_tensor(NormalizeCTIntensity(domain="hu")(plain)), torch.as_tensor(LungWindow()(plain))
    )
    with pytest.raises(ValueError, match="unknown intensity domain"):
        NormalizeCTIntensity()(plain)
    done = NormalizeCTIntensity()(_meta_tensor(plain, "hu"))
    with pytest.raises(ValueError, match="already normalised"):
        NormalizeCTIntensity()(done)
    with pytest.raises(ValueError):
        NormalizeCTIntensity(domain="HU")


def test_normalize_real_volumes_by_their_domain(totalseg_dir, medseg_dir):
    """TotalSegmentator HU and MedSeg 0..4095 display volumes both end in [0, 1] the right way."""
    from ctcovid.io import load_ct

    hu = load_ct(totalseg_dir / "example_ct_sm.nii.gz")
    disp = load_ct(medseg_dir / "images" / "rp4.nii.gz")
    out_hu, out_disp = NormalizeCTIntensity()(hu), NormalizeCTIntensity()(disp)
    for out in (out_hu, out_disp):
        assert out.dtype == torch.float32 and 0 <= float(out.min()) and float(out.max()) <= 1
    air = hu.as_tensor() < -990
    assert float(out_hu.as_tensor()[air].mean()) == pytest.approx(
        float(((hu.as_tensor()[air] + 1350) / 1500).mean()), abs=1e-5
    )
    lo, hi = RobustDisplayScaling().percentiles(disp)  # 16.7 M voxels: estimated from 4.2 M random ones
    inside = disp.as_tensor()[disp.as_tensor() != 0].numpy()
    # the estimates sit at the right ranks of the whole volume: within 0.05 percentile point
    assert np.mean(inside < lo) * 100 <= 0.55 and np.mean(inside <= lo) * 100 >= 0.45
    assert np.mean(inside < hi) * 100 <= 99.55 and np.mean(inside <= hi) * 100 >= 99.45
    assert RobustDisplayScaling().percentiles(disp) == (lo, hi)  # deterministic
    assert out_disp.meta["filename_or_obj"] == disp.meta["filename_or_obj"]
    torch.testing.assert_close(out_disp.affine, disp.affine)


# ---------------------------------------------------------------------------- dictionary twins


def test_dictionary_twins_keep_meta_and_handle_missing_keys():
    hu = _meta_tensor(np.full((1, 2, 2, 2), -1000.0), "hu")
    disp = _meta_tensor(_fov_volume(), "display")
    out = NormalizeCTIntensityd(keys=["ct", "scan", "absent"], allow_missing_keys=True)(
        {"ct": hu, "scan": disp, "label": 3}
    )
    assert out["label"] == 3 and "absent" not in out
    assert (
        out["ct"].meta[NORMALIZATION_META_KEY].startswith("lung_window")
        and out["ct"].meta["intensity_domain"] == "hu"
    )
    assert out["scan"].meta[NORMALIZATION_META_KEY].startswith("percentiles")
    torch.testing.assert_close(out["ct"].affine, hu.affine)
    assert float(out["ct"].max()) == pytest.approx(350 / 1500)

    torch.testing.assert_close(LungWindowd("ct")({"ct": hu})["ct"].as_tensor(), LungWindow()(hu).as_tensor())
    torch.testing.assert_close(
        RobustDisplayScalingd("scan", lower=1, upper=99)({"scan": disp})["scan"].as_tensor(),
        RobustDisplayScaling(1, 99)(disp).as_tensor(),
    )
    for twin in (LungWindowd("ct"), RobustDisplayScalingd("ct"), NormalizeCTIntensityd("ct")):
        with pytest.raises(KeyError):
            twin({"other": hu})
