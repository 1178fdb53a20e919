"""The benchmarks' synthetic CT series and their paper-style baseline (``benchmarks/``), against the pipeline.

What is real and what is not:
- the scan is the synthetic chest phantom of ``benchmarks/common.py`` (28 slices of 128x128, lungs on
  slices 5..22), written as a DICOM series and read by ``ctcovid.io.load_ct``;
- the lung segmenter is the shipped, trained one, so the lung masks and the mask-area slice selection
  compared here are real outputs;
- the slice filter, detection and severity networks have random weights (``random_weight_bundles``). To
  keep this file within its time budget the detection and severity bundles are shrunk through config
  overrides the pipeline reads anyway: 2 DenseNet-161 members on 16 x 96 x 96 stacks, 2 Inception-v3
  members on 8 + 4 x 96 x 96 stacks, the slice filter at 112 x 112 (the paper's 3 + 6 members at full size
  take minutes here). The code paths are the same; only depths, sizes and member counts change.

The baseline differs from the pipeline in one intended way: nearest-neighbour instead of linear depth
resampling. So the checks are: the baseline's prepared inputs equal an independent reference built with
``ctcovid.transforms`` from nearest-picked slices (every channel), and equal the pipeline's own linear
stacks on the output slices where both sample a whole slice; that linear reference is tied to the pipeline
by reproducing the pipeline's member probabilities from it; and the baseline's probabilities are the
members' softmax on its own input, averaged. Kept slices and lung masks must agree directly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctcovid.bundle import bundles_root

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import PHANTOM, lung_slice_indices, random_weight_bundles, write_synthetic_ct_series  # noqa: E402
from ct_pipeline_baseline import (  # noqa: E402
    DETECTION_INPUT_FILE,
    SEVERITY_INPUT_FILE,
    nearest_depth_indices,
    run_baseline,
)

N_SLICES, SIZE = 28, 128
SPACING = (0.7, 0.7, 1.0)

#: Smaller networks for the test (see the module docstring); the keys are those of the bundles' configs.
SMALL = {
    "ct_lung_slice_filter": {"spatial_size": [112, 112]},
    "ct_covid_classification": {"num_members": 2, "depth": 16, "spatial_size": [96, 96]},
    "ct_covid_severity_classification": {
        "backbones": ["inception_v3"],
        "repeats": 2,
        "depths": [8, 4],
        "spatial_size": [96, 96],
    },
}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _pixel(u: float, v: float) -> tuple[int, int]:
    """Array index ``(X, Y)`` of phantom point ``(u, v)`` (``X`` = column)."""
    return int((u + 0.5) * SIZE), int((v + 0.5) * SIZE)


def _phantom_lungs(n_slices: int) -> np.ndarray:
    """``(X, Y, Z)`` bool: the phantom's lung ellipses (vessels included), the ground truth of the mask."""
    grid = (np.arange(SIZE) + 0.5) / SIZE - 0.5
    u, v = np.meshgrid(grid, grid, indexing="ij")  # (X, Y): u along X (columns), v along Y (rows)
    out = np.zeros((SIZE, SIZE, n_slices), dtype=bool)
    for k in range(n_slices):
        s = PHANTOM.lung_scale(k / (n_slices - 1))
        if s > 0:
            a, b = PHANTOM.lung_axes[0] * s, PHANTOM.lung_axes[1] * s
            for cu, cv in PHANTOM.lung_centers:
                out[:, :, k] |= ((u - cu) / a) ** 2 + ((v - cv) / b) ** 2 <= 1.0
    return out


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    return write_synthetic_ct_series(
        tmp_path_factory.mktemp("synthetic") / "series", n_slices=N_SLICES, size=SIZE, spacing=SPACING
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """All four stages: the shipped segmenter and small random-weight slice filter, detection and severity.

    Random Inception members in eval mode give logits of ~1e8 (activations grow through BatchNorm with
    default statistics), so their softmax is one-hot whatever the input; their heads are scaled by 1e-8
    so the severity probabilities depend on the input and a wrong input would show.
    """
    seg = bundles_root() / "ct_lung_segmentation" / "models" / "model.pt"
    if not seg.is_file():
        pytest.skip(f"the lung segmenter has no shipped weights ({seg})")
    from ctcovid.ct import CTCovidPipeline

    root = random_weight_bundles(tmp_path_factory.mktemp("bundles"), overrides=SMALL)
    pipe = CTCovidPipeline(bundle_dir=root, device="cpu", batch_size=8, severity="always", gradcam=True)
    with torch.no_grad():
        for member in pipe.grader.network.members:
            member.backbone.get_classifier().weight.mul_(1e-8)
    return pipe


def _without(pipe, *models: str, **attrs):
    """A shallow copy of ``pipe`` in which the named models have no network (as without weights)."""
    out = copy.copy(pipe)
    out.models = {
        key: dataclasses.replace(m, network=None, skipped="off in this test") if key in models else m
        for key, m in pipe.models.items()
    }
    for k, v in attrs.items():
        setattr(out, k, v)
    return out


def _normalized(pipe, stage: str, series: Path) -> torch.Tensor:
    """``(1, X, Y, Z)``: the scan normalised as the pipeline normalises it for ``stage``."""
    from ctcovid.io import load_ct
    from ctcovid.transforms import NormalizeCTIntensity

    return NormalizeCTIntensity(**(pipe.normalization_args.get(stage) or {}))(load_ct(series)).as_tensor().float()


def _stacks_nearest(img, mask, kept, depths, size) -> torch.Tensor:
    """Reference for the baseline: nearest-picked kept slices, then ``BuildDetectionInput`` in-plane only."""
    from ctcovid.transforms import BuildDetectionInput

    out = []
    for d in depths:
        # nearest kept slice of output slice i (independent of the baseline's helper): round(i (K-1)/(d-1))
        idx = [kept[int(np.floor(i * (len(kept) - 1) / (d - 1) + 0.5))] for i in range(d)]
        sel = torch.as_tensor(idx)
        m = None if mask is None else mask.index_select(3, sel)
        out.append(BuildDetectionInput(depth=d, spatial_size=size)(img.index_select(3, sel), m))
    return torch.cat(out)


def _whole_slice_channels(n_kept: int, depth: int) -> list[int]:
    """Output slices whose sampling position ``i (K-1)/(depth-1)`` is a whole slice (linear == nearest)."""
    return [i for i in range(depth) if (i * (n_kept - 1)) % (depth - 1) == 0]


def test_synthetic_series_reads_as_hu(series, tmp_path):
    from ctcovid.io import load_ct

    vol = load_ct(series)
    assert tuple(vol.shape) == (1, SIZE, SIZE, N_SLICES)
    assert vol.meta["intensity_domain"] == "hu" and vol.meta["source_format"] == "dicom"
    assert np.allclose(vol.meta["spacing"], SPACING)
    a = vol[0].numpy()
    lungs = lung_slice_indices(N_SLICES)
    assert lungs == list(range(5, 23))  # the central ~70 %: no lung on the 5 slices at either end

    def patch(u: float, v: float, k: int) -> float:
        x, y = _pixel(u, v)
        return float(np.median(a[x - 2 : x + 3, y - 2 : y + 3, k]))

    mid = N_SLICES // 2
    lung_u, lung_v = PHANTOM.lung_centers[0]
    lung_values = a[_phantom_lungs(N_SLICES)[:, :, mid], mid]
    assert abs(float(np.median(lung_values)) - PHANTOM.lung_hu) < 15
    assert abs(patch(0.0, -0.2, mid) - PHANTOM.tissue_hu) < 15  # anterior soft tissue
    assert abs(patch(*PHANTOM.spine_center, mid) - PHANTOM.bone_hu) < 25
    assert abs(float(np.median(a[:8, :8, mid])) - PHANTOM.air_hu) < 10  # corner: air
    for k in (lungs[0] - 1, lungs[-1] + 1):  # just outside the lung range the lung centre is soft tissue
        assert abs(patch(lung_u, lung_v, k) - PHANTOM.tissue_hu) < 15
    assert patch(lung_u, lung_v, lungs[0]) < -700
    # lung cross-section grows to the middle and shrinks again
    area = _phantom_lungs(N_SLICES).sum(axis=(0, 1))
    assert area[lungs[0]] < area[mid] and area[lungs[-1]] < area[mid]

    # deterministic for a seed, different for another seed
    again = write_synthetic_ct_series(tmp_path / "again", n_slices=N_SLICES, size=SIZE, spacing=SPACING)
    name = "slice_0013.dcm"
    assert (again / name).read_bytes() == (series / name).read_bytes()
    other = write_synthetic_ct_series(tmp_path / "other", n_slices=N_SLICES, size=SIZE, seed=1)
    assert (other / name).read_bytes() != (series / name).read_bytes()


def test_baseline_matches_pipeline_on_all_stages(series, pipeline, tmp_path):
    """Mask-area slice selection (slice filter off), detection + Grad-CAM + severity on every scan."""
    from ctcovid.transforms import BuildDetectionInput, BuildSeverityInput

    pipe = _without(pipeline, "slice_filter")
    base = run_baseline(series, pipe, tmp_path / "work", gradcam=True)
    res = pipe(series)

    assert set(base["timings_s"]) == {
        "read",
        "segmentation",
        "volume_building",
        "detection",
        "gradcam",
        "severity",
        "write",
    }
    # kept slices and masks: the same decisions as the pipeline, and the phantom's lungs
    assert base["kept_slices"] == res.kept_slices == lung_slice_indices(N_SLICES)
    assert base["lung_mask"].shape == res.lung_mask.shape == (SIZE, SIZE, N_SLICES)
    assert base["lung_mask"].dtype == np.uint8
    assert _dice(base["lung_mask"], res.lung_mask) >= 0.95
    assert _dice(base["lung_mask"], _phantom_lungs(N_SLICES)) >= 0.9

    kept = base["kept_slices"]
    keep = torch.as_tensor(kept)
    mask = torch.from_numpy(base["lung_mask"])[None].float()

    # detection input: every channel equals the nearest-slice reference; on whole-slice channels it also
    # equals the pipeline's linear stack
    det = np.load(tmp_path / "work" / DETECTION_INPUT_FILE)
    assert det.shape == (16, 96, 96)
    img = _normalized(pipe, "detection", series)
    det_mask = mask if pipe.detector.config_value("mask_lung", default=True) else None
    ref = _stacks_nearest(img, det_mask, kept, (16,), (96, 96)).numpy()
    np.testing.assert_allclose(det, ref, atol=1e-5)
    linear = BuildDetectionInput(depth=16, spatial_size=(96, 96))(
        img.index_select(3, keep), None if det_mask is None else det_mask.index_select(3, keep)
    )
    same = _whole_slice_channels(len(kept), 16)
    assert len(same) >= 2
    np.testing.assert_allclose(det[same], linear.numpy()[same], atol=1e-5)
    assert np.abs(det - linear.numpy()).max() > 1e-3  # the interpolated channels do differ
    assert np.array_equal(nearest_depth_indices(len(kept), len(kept)), np.arange(len(kept)))

    with torch.no_grad():
        # the linear reference is what the pipeline fed its members ...
        pipe_members = pipe.detector.network.member_probabilities(linear[None])[0, :, 1]
        # ... and the baseline's probabilities are the members' softmax on its own input, averaged
        base_members = pipe.detector.network.member_probabilities(torch.from_numpy(det[None]).float())[0]
    np.testing.assert_allclose(res.covid_member_probabilities, pipe_members.numpy(), atol=1e-5)
    np.testing.assert_allclose(base["covid_member_probabilities"], base_members.numpy(), atol=1e-6)
    assert base["covid_probability"] == pytest.approx(float(base_members[:, 1].mean()), abs=1e-6)

    # Grad-CAM: same layer, class and averaging; inputs differ only on the interpolated channels
    assert base["heatmap"].shape == res.heatmap.shape == (SIZE, SIZE)
    assert 0.0 <= base["heatmap"].min() and base["heatmap"].max() <= 1.0
    assert np.abs(base["heatmap"] - res.heatmap).max() < 0.05

    # severity input: two nearest-picked stacks (8 + 4), lung-masked as the bundle says
    sev = np.load(tmp_path / "work" / SEVERITY_INPUT_FILE)
    assert sev.shape == (12, 96, 96)
    img = _normalized(pipe, "severity", series)
    sev_mask = mask if pipe.grader.config_value("mask_lung", default=True) else None
    np.testing.assert_allclose(sev, _stacks_nearest(img, sev_mask, kept, (8, 4), (96, 96)).numpy(), atol=1e-5)
    linear = BuildSeverityInput(depths=(8, 4), spatial_size=(96, 96))(
        img.index_select(3, keep), None if sev_mask is None else sev_mask.index_select(3, keep)
    )
    same = _whole_slice_channels(len(kept), 8) + [8 + i for i in _whole_slice_channels(len(kept), 4)]
    np.testing.assert_allclose(sev[same], linear.numpy()[same], atol=1e-5)
    with torch.no_grad():
        pipe_mean, _ = pipe.grader.network.predict_with_spread(linear[None])
        base_members = pipe.grader.network.member_probabilities(torch.from_numpy(sev[None]).float())[0]
    np.testing.assert_allclose(list(res.severity_probabilities.values()), pipe_mean[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(base["severity_member_probabilities"], base_members.numpy(), atol=1e-6)
    np.testing.assert_allclose(base["severity_probabilities"], base_members.mean(0).numpy(), atol=1e-6)
    assert np.ptp(np.asarray(base["severity_member_probabilities"])) > 1e-3  # not saturated one-hots

    # outputs: the mask in the scan's geometry (the baseline's own DICOM affine) and the JSON record
    saved = nib.load(base["outputs"]["lung_mask"])
    assert np.array_equal(np.asarray(saved.dataobj), base["lung_mask"])
    np.testing.assert_allclose(saved.affine, res.affine, atol=1e-4)
    record = json.loads(Path(base["outputs"]["record"]).read_text())
    assert record["kept_slices"] == kept and record["covid_probability"] == base["covid_probability"]

    # severity gate: with severity="covid" a scan below the COVID-19 threshold is not graded
    gated = _without(pipeline, "slice_filter", severity_mode="covid", covid_threshold=1.01)
    base = run_baseline(series, gated, tmp_path / "gated", gradcam=False)
    assert base["prediction"] == "non-COVID-19" and base["severity_probabilities"] is None
    assert "severity" not in base["timings_s"] and "gradcam" not in base["timings_s"]


def test_baseline_slice_filter_and_nifti_match_pipeline(series, pipeline, tmp_path):
    """Slice-filter selection (random weights: compared numerically), and the NIfTI reading path."""
    pipe = _without(pipeline, "detection", "severity", use_gradcam=False)

    # reference probabilities: the pipeline's recipe written out with torch (normalise, resize, softmax)
    img = _normalized(pipe, "slice_filter", series)
    x = F.interpolate(img[0].permute(2, 0, 1)[:, None], size=(112, 112), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref = torch.softmax(pipe.slice_filter.network(x), dim=1)[:, 1].numpy()
    # a random filter's probabilities differ by ~1e-4 between slices: threshold in the widest gap that
    # leaves at least 3 slices on either side, so both implementations must rank the slices alike
    order = np.sort(ref)
    gaps = np.diff(order)[2:-3]
    j = int(np.argmax(gaps)) + 2
    pipe.slice_threshold = float(order[j] + order[j + 1]) / 2

    base = run_baseline(series, pipe, tmp_path / "dicom", gradcam=False)
    assert set(base["timings_s"]) == {"read", "slice_filter", "segmentation", "write"}
    err = np.abs(np.asarray(base["slice_probabilities"]) - ref).max()
    assert err < 1e-5 and gaps.max() > 20 * err
    expected = [k for k in range(N_SLICES) if ref[k] >= pipe.slice_threshold]
    assert 3 <= len(expected) <= N_SLICES - 3

    res = pipe(series)
    assert res.slice_selection == "slice_filter"
    assert base["kept_slices"] == res.kept_slices == expected
    assert _dice(base["lung_mask"], res.lung_mask) >= 0.95
    assert base["covid_probability"] is None and base["severity_probabilities"] is None

    # the same scan as NIfTI (float64 get_fdata, slice by slice): the same numbers as from the DICOM files
    from ctcovid.io import load_ct

    vol = load_ct(series)
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(vol[0].numpy(), np.asarray(vol.meta["affine"], dtype=np.float64)), str(nifti))
    from_nifti = run_baseline(nifti, pipe, tmp_path / "nifti", gradcam=False)
    np.testing.assert_allclose(from_nifti["slice_probabilities"], base["slice_probabilities"], atol=1e-6)
    assert from_nifti["kept_slices"] == base["kept_slices"]
    assert np.array_equal(from_nifti["lung_mask"], base["lung_mask"])
    assert Path(from_nifti["outputs"]["lung_mask"]).name == "scan_lung_mask.nii.gz"
