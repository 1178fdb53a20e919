"""The lung mask's 3D clean-up (:mod:`ctcovid.ct.mask_cleanup`) gives MONAI's answer, faster."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("connectivity", [1, 3])
@pytest.mark.parametrize("num_components", [1, 2])
def test_keep_largest_components_matches_monai(connectivity, num_components):
    """The pipeline's 32-bit connected-component clean-up gives MONAI's KeepLargestConnectedComponent result,
    also on the mask's bounding box (``_clean_mask``) rather than the whole volume."""
    from monai.transforms import KeepLargestConnectedComponent

    from ctcovid.ct.mask_cleanup import bounding_box, keep_largest_components

    mask = np.zeros((40, 30, 20), dtype=np.uint8)
    mask[5:15, 5:15, 5:15] = 1  # 1000 voxels
    mask[20:26, 5:11, 5:11] = 1  # 216
    mask[26, 11, 11] = 1  # touches the 216 block only diagonally: joins it with full connectivity
    mask[30:33, 20:23, 2:5] = 1  # 27
    mask[38, 28, 18] = 1  # a single voxel near the edge
    monai_keep = KeepLargestConnectedComponent(
        applied_labels=[1], num_components=num_components, connectivity=connectivity
    )
    ref = monai_keep(torch.from_numpy(mask.copy())[None])[0].numpy()  # a copy: MONAI edits its input in place
    out = keep_largest_components(mask.copy(), num_components, connectivity)
    np.testing.assert_array_equal(out, ref)
    assert out.sum() < mask.sum()  # something was removed
    box = bounding_box(mask, margin=1)
    boxed = mask.copy()
    boxed[box] = keep_largest_components(np.ascontiguousarray(mask[box]), num_components, connectivity)
    np.testing.assert_array_equal(boxed, ref)
    assert bounding_box(np.zeros((3, 3, 3), np.uint8)) is None


def test_keep_largest_components_beyond_16_bit_labels():
    """More components than 16-bit labels hold (isolated voxels on every other grid point): the clean-up
    falls back to 32-bit labels and still gives MONAI's result."""
    from monai.transforms import KeepLargestConnectedComponent

    from ctcovid.ct.mask_cleanup import keep_largest_components

    mask = np.zeros((104, 104, 104), dtype=np.uint8)
    mask[::2, ::2, ::2] = 1  # 52**3 = 140608 one-voxel components under 6-connectivity
    mask[:10, :10, :10] = 1  # one 1000-voxel block
    mask[-6:, -6:, -6:] = 1  # and a 216-voxel one
    ref = KeepLargestConnectedComponent(applied_labels=[1], num_components=2, connectivity=1)(
        torch.from_numpy(mask.copy())[None]
    )[0].numpy()
    out = keep_largest_components(mask.copy(), 2, 1)
    np.testing.assert_array_equal(out, ref)
    assert 1000 + 216 <= out.sum() < mask.sum() // 50  # the two blocks (and the grid points they touch)
