"""CT pipeline speed options change nothing that matters: bf16 autocast, channels-last, batch size, and the
memory hand-over of the scan (models of :mod:`ct_fixtures`; real lungmask CT slices)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import data_path
from ct_fixtures import DET_BUNDLE, INFECTION_BUNDLE, SEG_BUNDLE, SEV_BUNDLE


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_bf16_autocast_moves_outputs_little(pipeline, test_bundles, shared_data):
    """bf16 autocast (issue 9) on the shipped segmenter: same lung mask to within a few edge pixels, the
    ensembles' probabilities to within 0.01, the same Grad-CAM, and the precision is part of the resume key."""
    from ctcovid.ct import CTCovidPipeline

    scan = data_path("fixtures", "lungmask_testdata")
    bf16 = CTCovidPipeline(bundle_dir=test_bundles, device="cpu", severity="always", precision="bf16")
    assert bf16.options()["precision"] == "bf16" and pipeline.options()["precision"] == "fp32"
    assert bf16.batch_size == 8  # the batch measured fastest per slice in bf16 on CPU
    ref, res = pipeline(scan), bf16(scan)
    assert res.lung_mask.sum() > 10_000  # the lungs of both slices, not an empty mask
    assert _dice(ref.lung_mask, res.lung_mask) >= 0.98
    assert abs(ref.covid_probability - res.covid_probability) < 0.01
    for name, p in ref.severity_probabilities.items():
        assert abs(p - res.severity_probabilities[name]) < 0.01
    # Grad-CAM stays fp32 under bf16 (an explanation must not depend on a speed option): the same map
    np.testing.assert_allclose(res.heatmap, ref.heatmap, atol=1e-4)
    with pytest.raises(ValueError, match="precision"):
        CTCovidPipeline(bundle_dir=test_bundles, device="cpu", precision="fp8")


def test_channels_last_and_batch_size_do_not_change_results(pipeline, test_bundles, shared_data):
    """Memory format, batch size and batch-norm folding are speed settings: the bundles' ``channels_last``
    values are applied and the segmenter's batch norms folded by default, and switching them off (or
    changing the batch size) leaves the mask and probabilities unchanged."""
    from ctcovid.ct import CTCovidPipeline
    from ctcovid.ct.network_runner import DEFAULT_BATCH_SIZE

    scan = data_path("fixtures", "lungmask_testdata")
    default = CTCovidPipeline(bundle_dir=test_bundles, device="cpu", severity="always")
    assert default.batch_size == DEFAULT_BATCH_SIZE["cpu"]["fp32"]
    bundle_says = {
        s: bool(json.loads((test_bundles / b / "configs" / "inference.json").read_text())["channels_last"])
        for s, b in (
            ("segmentation", SEG_BUNDLE),
            ("infection", INFECTION_BUNDLE),
            ("detection", DET_BUNDLE),
            ("severity", SEV_BUNDLE),
        )
    }
    assert default.channels_last == bundle_says  # the slice filter has no weights here
    conv = next(m for m in default.segmenter.network.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == bundle_says["segmentation"]

    flipped = CTCovidPipeline(
        bundle_dir=test_bundles,
        device="cpu",
        severity="always",
        batch_size=1,
        channels_last=False,
        fold_batchnorm=False,
    )
    assert not any(flipped.channels_last.values())

    def batchnorms(p):
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in p.segmenter.network.modules())

    # both slice segmenters (lungs, lesions) are the same Attention U-Net: 22 batch norms each
    assert default.folded_batchnorms == {"segmentation": 22, "infection": 22}
    assert flipped.folded_batchnorms == {"segmentation": 0, "infection": 0}
    # and their 4 instance norms (MONAI UpConv) run as group norms
    assert default.swapped_instance_norms == {"segmentation": 4, "infection": 4}
    assert flipped.swapped_instance_norms == {"segmentation": 0, "infection": 0}
    assert batchnorms(default) == batchnorms(flipped) - 22
    ref, res = pipeline(scan), flipped(scan)  # pipeline: batch 8 with the bundles' formats
    assert _dice(ref.lung_mask, res.lung_mask) > 0.9999
    assert ref.infection_mask.sum() > 0 and _dice(ref.infection_mask, res.infection_mask) > 0.99
    assert abs(ref.covid_probability - res.covid_probability) < 1e-4
    for name, p in ref.severity_probabilities.items():
        assert abs(p - res.severity_probabilities[name]) < 1e-4


def test_stage_progress_and_volume_building_timing(pipeline, shared_data):
    """Stages are announced in run order; building the ensembles' stacks is timed on its own."""
    seen: list[str] = []
    volume = pipeline.read(data_path("fixtures", "lungmask_testdata"))
    res = pipeline.process(volume, on_stage=seen.append)
    assert seen == [
        "normalize",
        "segmentation",
        "mask_cleanup",
        "infection",
        "involvement",
        "volume_building",
        "detection",
        "gradcam",
        "volume_building",
        "severity",
    ]
    assert res.stages["volume_building"] == "ok"
    assert {"normalize", "segmentation", "volume_building", "detection", "gradcam", "severity"} <= set(
        res.timings_s
    )


def test_handed_over_volume_is_freed_once_normalised(pipeline, shared_data):
    """A volume passed straight into ``process`` (as ``__call__`` and the batch runner pass it) is freed as
    soon as its normalised views exist, not kept beside them for the whole scan."""
    import weakref

    refs: list[weakref.ref] = []
    alive_at: dict[str, bool] = {}

    def read_and_watch():
        volume = pipeline.read(data_path("fixtures", "lungmask_testdata"))
        refs.append(weakref.ref(volume))
        return volume

    res = pipeline.process(read_and_watch(), on_stage=lambda s: alive_at.setdefault(s, refs[0]() is not None))
    assert alive_at["normalize"] is True  # still needed while normalising
    assert alive_at["segmentation"] is False and refs[0]() is None
    assert res.covid_probability is not None and res.severity is not None  # later stages had their views
    # a caller that keeps its own reference keeps its volume, unchanged
    kept = pipeline.read(data_path("fixtures", "lungmask_testdata"))
    before = kept.clone()
    pipeline.process(kept)
    assert torch.equal(kept, before)
