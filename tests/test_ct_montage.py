"""The scan montage (:mod:`ctcovid.ct.montage`)."""

from __future__ import annotations

import numpy as np


def test_montage_frees_its_tile_images_without_the_cycle_collector(tmp_path):
    """matplotlib's artists refer to each other; the montage clears its figure so the tiles' image
    arrays (~140 MB for 16 tiles of 512x512) are freed at once, not at some later garbage collection."""
    import gc

    from ctcovid.ct.montage import save_montage_png

    rng = np.random.default_rng(0)
    image = rng.random((96, 96, 6), dtype=np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[20:70, 20:70] = 1
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what only the cycle collector would free lands in gc.garbage
    try:
        out = save_montage_png(tmp_path / "m.png", image, mask, range(6), heatmap=image[..., 0], title="t")
        gc.collect()
        stranded = [o.shape for o in gc.garbage if isinstance(o, np.ndarray) and o.size >= 96 * 96]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert out.is_file()
    assert stranded == []
