"""Batched CLAHE: value for value what scikit-image's ``equalize_adapthist`` gives, image by image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.exposure import equalize_adapthist

from ctcovid.transforms import CLAHE, CLAHEd
from ctcovid.transforms.clahe import equalize_adapthist_batch


def _scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A CT-like test image in [0, 1]: dark background and body, two darker 'lungs' with bright dots
    (vessels), a smooth gradient and noise; large flat areas make histogram clipping and the excess
    redistribution do real work."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w))
    img[((yy - 0.5) ** 2 / 0.16 + (xx - 0.5) ** 2 / 0.2) < 1] = 0.55
    for cx in (0.33, 0.67):
        img[((yy - 0.5) ** 2 / 0.09 + (xx - cx) ** 2 / 0.015) < 1] = 0.15
    dots = rng.random((h, w)) < 0.01
    img[dots] = 0.7
    img += 0.1 * yy + rng.normal(0, 0.02, (h, w))
    return np.clip((img - img.min()) / (img.max() - img.min()), 0, 1)


@pytest.mark.parametrize(
    ("shape", "kernel_size", "clip_limit", "nbins"),
    [
        ((6, 256, 256), None, 0.01, 256),  # the CT lesion model's setting
        ((3, 203, 317), None, 0.01, 256),  # sizes no kernel divides: reflected regions past the end
        ((3, 256, 256), (20, 28), 0.03, 128),  # unequal kernel sides, fewer bins
        ((2, 90, 70), 16, 0.0, 64),  # no clip limit (plain adaptive equalisation)
        ((2, 64, 64), 8, 1.0, 256),  # clip limit at its maximum
    ],
)
def test_batch_equals_scikit_image_per_image(shape, kernel_size, clip_limit, nbins):
    rng = np.random.default_rng(7)
    images = np.stack([_scene(rng, *shape[1:]) for _ in range(shape[0])])
    expected = np.stack([equalize_adapthist(im, kernel_size, clip_limit, nbins) for im in images])
    got = equalize_adapthist_batch(images, kernel_size, clip_limit, nbins)
    assert got.dtype == np.float64 and got.shape == images.shape
    np.testing.assert_array_equal(got, expected)


def test_batch_equals_scikit_image_on_uniform_noise_and_a_step():
    """Random noise (every bin filled, little to clip) and a two-level image (all counts in two bins per
    region: the most excess to spread) both come out exactly as scikit-image's."""
    rng = np.random.default_rng(0)
    step = np.zeros((128, 128))
    step[:, 64:] = 1.0
    images = np.stack([rng.random((128, 128)), step, rng.random((128, 128)) ** 4])
    expected = np.stack([equalize_adapthist(im) for im in images])
    np.testing.assert_array_equal(equalize_adapthist_batch(images), expected)


def test_batch_equals_scikit_image_on_real_ct_slices(shared_data):
    """Lesion-model inputs as they really look: 24 of the Ma et al. CT slices."""
    files = sorted((shared_data / "ct" / "ma2020_slices" / "ct").glob("*.png"))[::57]
    assert len(files) >= 20
    images = np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.float64) / 255.0 for f in files])
    expected = np.stack([equalize_adapthist(im, clip_limit=0.01) for im in images])
    np.testing.assert_array_equal(equalize_adapthist_batch(images, clip_limit=0.01), expected)


def test_clahe_transform_gives_what_it_gave_per_slice_with_scikit_image():
    """The transform's own scaling around the equalisation (each slice to [0, 1] and back to its range,
    constant slices untouched) is unchanged: computed here the way it was, one slice at a time."""
    rng = np.random.default_rng(3)
    vol = np.stack([_scene(rng, 96, 96) * 300 - 100, _scene(rng, 96, 96), np.full((96, 96), 0.25)], axis=-1)
    vol = torch.as_tensor(vol[None], dtype=torch.float32)  # (1, H, W, D), HU-like and [0, 1] slices
    out = CLAHE(clip_limit=0.02)(vol)
    for k in range(vol.shape[-1]):
        ch = vol[0, :, :, k].numpy().astype(np.float64)
        lo, hi = ch.min(), ch.max()
        if hi > lo:
            eq = equalize_adapthist((ch - lo) / (hi - lo), clip_limit=0.02)
            ch = lo + np.clip(eq, 0, 1) * (hi - lo)
        np.testing.assert_array_equal(out[0, :, :, k].numpy(), ch.astype(np.float32))


def test_batch_rejects_wrong_shapes_and_ranges():
    with pytest.raises(ValueError, match=r"\(B, H, W\) images, got shape \(4, 4\)"):
        equalize_adapthist_batch(np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        equalize_adapthist_batch(np.full((1, 8, 8), 2.0))
    with pytest.raises(ValueError, match="kernel_size"):
        equalize_adapthist_batch(np.zeros((1, 8, 8)), kernel_size=(2, 2, 2))


def test_histogram_clipping_equals_scikit_image_on_many_histograms():
    """The excess spreading (even part, then one count per bin in skimage's stepping over several passes)
    on histograms made to need every branch: spikes over a sparse floor, bins near the limit, and
    excess left over after each pass."""
    from skimage.exposure._adapthist import clip_histogram

    from ctcovid.transforms.clahe import _clip_histograms

    rng = np.random.default_rng(11)
    hists = []
    for _ in range(400):
        nbins = int(rng.choice([16, 64, 256]))
        clip = int(rng.integers(2, 40))
        kind = rng.integers(3)
        if kind == 0:
            h = rng.integers(0, clip + 1, nbins) * (rng.random(nbins) < rng.uniform(0.05, 1.0))
        elif kind == 1:  # nearly full: bins fill up within a pass
            h = clip - rng.integers(0, 3, nbins)
        else:  # full but for holes in the first bins: a pass cannot go back to them, the next one must
            h = np.full(nbins, clip - 1)
            h[: int(rng.integers(1, 4))] = 0
        spikes = rng.integers(0, nbins, int(rng.integers(1, 6)))
        h[spikes] += rng.integers(1, 30 * clip, spikes.size)
        hists.append((h.astype(np.int64), clip))
    by_shape: dict = {}
    for h, clip in hists:
        by_shape.setdefault((h.size, clip), []).append(h)
    for (_, clip), group in by_shape.items():
        batch = np.stack(group)
        expected = np.stack([clip_histogram(h.copy(), clip) for h in group])
        _clip_histograms(batch, clip)
        np.testing.assert_array_equal(batch, expected)


def test_clahed_leaves_samples_flagged_as_equalised_alone():
    rng = np.random.default_rng(2)
    img = torch.as_tensor(_scene(rng, 64, 64)[None], dtype=torch.float32)
    t = CLAHEd(keys="image", clip_limit=0.02, skip_key="equalised")
    assert torch.equal(t({"image": img, "equalised": True})["image"], img)
    for sample in ({"image": img, "equalised": False}, {"image": img}):
        assert torch.equal(t(sample)["image"], CLAHE(clip_limit=0.02)(img))
