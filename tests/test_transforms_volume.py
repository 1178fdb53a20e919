"""Volume-building transforms: slice selection, lung masking, depth resampling, network inputs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Compose

from ctcovid.io.errors import CTInputError, NoLungSlicesError
from ctcovid.transforms import (
    BuildDetectionInput,
    BuildDetectionInputd,
    BuildSeverityInput,
    BuildSeverityInputd,
    LungSlicesFromMask,
    LungSlicesFromMaskd,
    MaskToLung,
    MaskToLungd,
    ResampleSlices,
    ResampleSlicesd,
    SelectLungSlices,
    SelectLungSlicesd,
    kept_slices_from_meta,
)
from ctcovid.transforms.volume import _PIECE, _build_stacks


def ramp_volume(n_slices: int, rows: int = 6, cols: int = 5, name: str = "scan_a.nii.gz") -> MetaTensor:
    """(1, rows, cols, n_slices) volume whose slice k is filled with the value k."""
    values = torch.arange(n_slices, dtype=torch.float32).reshape(1, 1, 1, n_slices)
    return MetaTensor(values.expand(1, rows, cols, n_slices).clone(), meta={"filename_or_obj": name})


# ---------------------------------------------------------------- ResampleSlices


def test_depth_resampling_is_linear_and_keeps_order():
    out = ResampleSlices(depth=5, spatial_size=(6, 5))(ramp_volume(3))
    assert out.shape == (5, 6, 5) and out.dtype == torch.float32
    # every pixel of output slice j carries the interpolated slice value
    torch.testing.assert_close(
        out.as_tensor(), torch.tensor([0, 0.5, 1, 1.5, 2]).reshape(5, 1, 1).expand(5, 6, 5)
    )

    for n_slices, depth in [(10, 64), (100, 64), (64, 64)]:
        got = ResampleSlices(depth, (6, 5))(ramp_volume(n_slices))[:, 0, 0]
        # first/last slices map to first/last output slices, linear in between
        expected = torch.arange(depth, dtype=torch.float32) * (n_slices - 1) / (depth - 1)
        torch.testing.assert_close(got.as_tensor(), expected)
        assert torch.all(torch.diff(got) > 0), "depth resampling must be strictly increasing (no duplicates)"


def test_nearest_would_duplicate_linear_does_not():
    vol = ramp_volume(10)
    nearest = F.interpolate(vol.as_tensor()[0].reshape(1, -1, 10), size=64, mode="nearest")[0, 0]
    assert len(torch.unique(nearest)) == 10  # nearest repeats slices: what the transform must not do
    linear = ResampleSlices(64, (6, 5))(vol)[:, 0, 0]
    assert len(torch.unique(linear)) == 64


def test_fewer_slices_than_target_and_single_slice():
    rng = torch.Generator().manual_seed(0)
    one = MetaTensor(torch.rand(1, 8, 8, 1, generator=rng), meta={"filename_or_obj": "one.nii"})
    out = ResampleSlices(depth=7, spatial_size=(8, 8))(one)
    assert out.shape == (7, 8, 8)
    for k in range(7):  # a single slice is repeated unchanged
        torch.testing.assert_close(out[k].as_tensor(), one[0, :, :, 0].as_tensor())

    two = ResampleSlices(depth=4, spatial_size=(6, 5))(ramp_volume(2))[:, 0, 0]
    torch.testing.assert_close(two.as_tensor(), torch.tensor([0, 1 / 3, 2 / 3, 1]))


def test_in_plane_is_bilinear_and_layout_is_depth_x_y():
    rng = torch.Generator().manual_seed(1)
    vol = torch.rand(1, 20, 16, 9, generator=rng)
    # same depth and size: identity, and out[k] is slice k with rows along X and columns along Y
    same = ResampleSlices(depth=9, spatial_size=(20, 16))(vol)
    for k in range(9):
        torch.testing.assert_close(same[k], vol[0, :, :, k])
    # same depth, new size: exactly torch's bilinear resize (pixel centres, no antialias) of each slice
    out = ResampleSlices(depth=9, spatial_size=(12, 10))(vol)
    ref = F.interpolate(vol[0].permute(2, 0, 1)[None], size=(12, 10), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, ref)


def test_resampling_order_does_not_matter_and_dtypes():
    rng = torch.Generator().manual_seed(2)
    x = torch.rand(30, 26, 11, generator=rng)
    resampler = ResampleSlices(depth=16, spatial_size=(14, 12))
    torch.testing.assert_close(
        _build_stacks(x, [resampler], depth_first=True)[0], _build_stacks(x, [resampler], depth_first=False)[0]
    )
    # integer HU and float64 inputs come out float32
    hu = (x * 2000 - 1000).to(torch.int16)[None]
    assert resampler(hu).dtype == torch.float32
    assert resampler(x.double().numpy()[None]).dtype == torch.float32
    with pytest.raises(CTInputError, match="one channel"):
        resampler(torch.zeros(2, 4, 4, 3))


# ---------------------------------------------------------------- slice selection


def test_select_lung_slices_keeps_order_and_records_indices():
    vol = ramp_volume(6)
    prob = np.array([0.1, 0.8, 0.5, 0.2, 0.95, 0.4])
    out = SelectLungSlices(threshold=0.5)(vol, prob)
    assert out.shape == (1, 6, 5, 3)
    assert out[0, 0, 0].tolist() == [1.0, 2.0, 4.0]
    assert kept_slices_from_meta(out.meta) == [1, 2, 4]
    assert "kept_slices" not in vol.meta  # input meta untouched
    # a second selection composes to original indices
    again = SelectLungSlices(threshold=0.5)(out, torch.tensor([0.0, 1.0, 1.0]))
    assert kept_slices_from_meta(again.meta) == [2, 4]
    with pytest.raises(ValueError, match="5 slice probabilities"):
        SelectLungSlices()(vol, prob[:5])


def test_no_lung_slices_raises_naming_the_scan():
    vol = ramp_volume(4, name="/data/patient7/ct.nii.gz")
    with pytest.raises(NoLungSlicesError, match="patient7/ct.nii.gz") as info:
        SelectLungSlicesd(["image"], threshold=0.5)({"image": vol, "slice_lung_prob": [0.1, 0.49, 0.0, 0.2]})
    assert info.value.path == "/data/patient7/ct.nii.gz"
    assert isinstance(info.value, CTInputError)


def test_lung_slices_from_mask_thresholds_area():
    mask = torch.zeros(1, 10, 10, 4)
    mask[0, :1, :3, 1] = 1  # 3 pixels
    mask[0, :2, :5, 2] = 2  # 10 pixels, label 2 (e.g. left lung)
    mask[0, :, :, 3] = 1  # 100 pixels
    torch.testing.assert_close(LungSlicesFromMask(min_area=0.05)(mask), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(
        LungSlicesFromMask(min_area=3, area_unit="pixels")(mask), torch.tensor([0.0, 1.0, 1.0, 1.0])
    )
    # zero minimum still needs one lung pixel
    torch.testing.assert_close(LungSlicesFromMask(min_area=0)(mask), torch.tensor([0.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError):
        LungSlicesFromMask(min_area=2.0, area_unit="fraction")


# ---------------------------------------------------------------- masking and network inputs


def test_mask_to_lung_multiplies_and_sets_background():
    img = MetaTensor(torch.full((1, 4, 4, 2), 0.7), meta={"filename_or_obj": "m.nii"})
    mask = torch.zeros(1, 4, 4, 2)
    mask[0, 1:3, 1:3, :] = 1
    out = MaskToLung()(img, mask)
    torch.testing.assert_close(out.as_tensor(), img.as_tensor() * mask)
    assert out.meta["filename_or_obj"] == "m.nii"
    out = MaskToLung(background=-1.0)(img, mask)
    assert out[mask == 0].eq(-1).all() and out[mask == 1].eq(0.7).all()
    assert MaskToLung()(torch.ones(1, 4, 4, 2, dtype=torch.int16), mask).dtype == torch.float32
    with pytest.raises(CTInputError, match=r"m\.nii: lung mask shape"):
        MaskToLung()(img, torch.ones(1, 4, 4, 3))


def test_build_inputs_shapes_and_concatenation():
    rng = torch.Generator().manual_seed(3)
    img = MetaTensor(torch.rand(1, 40, 36, 9, generator=rng), meta={"filename_or_obj": "b.nii"})
    mask = (torch.rand(1, 40, 36, 9, generator=rng) > 0.3).float()
    det = BuildDetectionInput(depth=16, spatial_size=32)(img)
    assert det.shape == (16, 32, 32)
    sev = BuildSeverityInput(depths=(8, 4), spatial_size=(24, 20))(img, mask)
    assert sev.shape == (12, 24, 20)
    masked = MaskToLung()(img, mask)
    torch.testing.assert_close(sev[:8], ResampleSlices(8, (24, 20))(masked))
    torch.testing.assert_close(sev[8:], ResampleSlices(4, (24, 20))(masked))


@pytest.mark.parametrize("depth_first", [True, False])
def test_masked_stacks_built_in_pieces_equal_masking_the_whole_volume(depth_first):
    # 2.5 pieces along X and along Z, taken as a non-contiguous view of a longer scan (kept slices)
    rows, cols, n = int(2.5 * _PIECE), 29, int(2.5 * _PIECE)
    rng = torch.Generator().manual_seed(5)
    scan = torch.rand(rows, cols, n + 7, generator=rng)
    vol = scan[:, :, 3 : 3 + n]
    mask = (torch.rand(rows, cols, n + 7, generator=rng) > 0.4).to(torch.uint8)[:, :, 3 : 3 + n]
    size, depth = (23, 19), 11
    # reference written out with torch alone: mask the whole volume, then depth (linear, end slices
    # kept) and plane (bilinear, pixel centres) in the forced order
    whole = torch.where(mask > 0.5, vol, torch.zeros(()))

    def depth_step(x):
        r, c, k = x.shape
        return F.interpolate(x.reshape(1, r * c, k), size=depth, mode="linear", align_corners=True).reshape(r, c, depth)

    def plane_step(x):
        y = F.interpolate(x.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False)
        return y[0].permute(1, 2, 0)

    ref = plane_step(depth_step(whole)) if depth_first else depth_step(plane_step(whole).contiguous())
    (out,) = _build_stacks(vol, [ResampleSlices(depth, size)], mask, MaskToLung(), depth_first=depth_first)
    assert out.shape == (*size, depth)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # the transforms take the same path: (depth, H, W) of the same numbers
    det = BuildDetectionInput(depth=depth, spatial_size=size)(vol[None], mask[None])
    torch.testing.assert_close(det, out.permute(2, 0, 1), rtol=0, atol=1e-6)


def test_full_size_network_inputs():
    img = torch.rand(1, 128, 128, 23)
    assert BuildDetectionInput()(img).shape == (64, 224, 224)
    assert BuildSeverityInput()(img).shape == (48, 299, 299)


def test_dictionary_chain_and_batch_collation():
    def case(name: str, lung_slices: slice) -> dict:
        img = MetaTensor(torch.rand(1, 32, 32, 12), meta={"filename_or_obj": name})
        mask = torch.zeros(1, 32, 32, 12)
        mask[0, 8:24, 8:24, lung_slices] = 1
        return {"image": img, "lung_mask": MetaTensor(mask, meta={"filename_or_obj": name})}

    chain = Compose(
        [
            LungSlicesFromMaskd("lung_mask", output_key="slice_lung_prob", min_area=0.1),
            SelectLungSlicesd(["image", "lung_mask"], prob_key="slice_lung_prob"),
            MaskToLungd("image", mask_key="lung_mask"),
            ResampleSlicesd("lung_mask", depth=4, spatial_size=16),
            BuildSeverityInputd("image", depths=(8, 4), spatial_size=16),
        ]
    )
    a, b = chain(case("a.nii", slice(2, 9))), chain(case("b.nii", slice(5, 7)))
    assert a["image"].shape == b["image"].shape == (12, 16, 16)
    assert kept_slices_from_meta(a["image"].meta) == list(range(2, 9))
    assert kept_slices_from_meta(b["lung_mask"].meta) == [5, 6]
    # different numbers of kept slices still collate into a batch
    batch = list_data_collate([a, b])
    assert batch["image"].shape == (2, 12, 16, 16)
    assert batch["image"].meta["kept_slices"] == ["2,3,4,5,6,7,8", "5,6"]
    det = BuildDetectionInputd("image", mask_key="lung_mask", depth=8, spatial_size=16)(
        SelectLungSlicesd(["image", "lung_mask"])(
            LungSlicesFromMaskd("lung_mask")(case("c.nii", slice(0, 3)))
        )
    )
    assert det["image"].shape == (8, 16, 16)


# ---------------------------------------------------------------- real CT


def test_real_ct_lung_slices_and_masked_volume(totalseg_dir):
    """TotalSegmentator example CT (30 slices, lung in the top 11) with its lobe labels 10-14 as lung mask."""
    ct = nib.load(totalseg_dir / "example_ct_sm.nii.gz")
    labels = np.asarray(nib.load(totalseg_dir / "example_seg.nii.gz").dataobj)
    name = str(totalseg_dir / "example_ct_sm.nii.gz")
    hu = np.asarray(ct.dataobj).astype(np.float32)
    # lung window [-1000, 400] HU to [0, 1]
    image = MetaTensor(np.clip((hu + 1000) / 1400, 0, 1)[None], meta={"filename_or_obj": name})
    lung = MetaTensor(
        ((labels >= 10) & (labels <= 14)).astype(np.float32)[None], meta={"filename_or_obj": name}
    )

    any_lung = SelectLungSlicesd(["image", "lung_mask"])(
        LungSlicesFromMaskd("lung_mask", min_area=1, area_unit="pixels")({"image": image, "lung_mask": lung})
    )
    kept = kept_slices_from_meta(any_lung["image"].meta)
    assert len(kept) == 11 and kept == list(range(19, 30))  # provenance: lung in 11 of 30 slices, at the top

    data = LungSlicesFromMaskd("lung_mask", min_area=0.01)({"image": image, "lung_mask": lung})
    area = lung[0].sum(dim=(0, 1))
    big = [k for k in range(30) if area[k] >= 0.01 * 122 * 101]
    data = SelectLungSlicesd(["image", "lung_mask"])(data)
    assert kept_slices_from_meta(data["image"].meta) == big and len(big) < 11
    data = MaskToLungd("image", mask_key="lung_mask")(data)
    outside = data["lung_mask"] == 0
    assert data["image"][outside].eq(0).all() and data["image"][~outside].mean() > 0
    sev = BuildSeverityInputd("image", depths=(8, 4), spatial_size=(75, 75))(data)["image"]
    assert sev.shape == (12, 75, 75) and 0 <= sev.min() and sev.max() <= 1

    # the abdominal slices alone hold no lung: a clear error for this scan
    abdomen = {"image": image[..., :19], "lung_mask": lung[..., :19]}
    with pytest.raises(NoLungSlicesError, match="example_ct_sm.nii.gz"):
        SelectLungSlicesd("image")(LungSlicesFromMaskd("lung_mask")(abdomen))
