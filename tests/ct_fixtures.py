"""CT pipeline fixtures shared by the pipeline tests (a pytest plugin: ``pytest_plugins`` in conftest.py).

- the lung and lesion segmenters are the shipped, trained ones (``bundles/ct_lung_segmentation``,
  ``bundles/ct_lung_infection_segmentation``);
- the detection and severity ensembles have no trained weights, so tiny versions (fewer members, shallow
  stacks, small slices; same architecture) are saved with random features and a head whose bias sets each
  member's output. That makes the expected probabilities known: the tests check the plumbing (class index,
  averaging, spread, severity gating, output files), not accuracy.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ctcovid.bundle import bundles_root

SEG_BUNDLE = "ct_lung_segmentation"
DET_BUNDLE = "ct_covid_classification"
SEV_BUNDLE = "ct_covid_severity_classification"
FILTER_BUNDLE = "ct_lung_slice_filter"
INFECTION_BUNDLE = "ct_lung_infection_segmentation"

#: Biases of the detection members' heads: member i outputs softmax([0, b_i]) up to tiny random weights.
DET_BIASES = (1.0, 2.0)
#: Severity head bias: "moderate" wins.
SEV_BIAS = (0.0, 3.0, 0.0, 0.0)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def copy_configs(name: str, dst_root: Path, overrides: dict | None = None) -> Path:
    src = bundles_root() / name
    dst = dst_root / name
    shutil.copytree(src / "configs", dst / "configs")
    (dst / "models").mkdir(parents=True)
    if overrides:
        cfg_file = dst / "configs" / "inference.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.update(overrides)
        cfg_file.write_text(json.dumps(cfg, indent=2))
    return dst


def set_head(classifier: torch.nn.Module, bias, scale: float = 0.0) -> None:
    """Scale the head's weights (0: the features do not matter) and set its bias: the output is then known.

    Grad-CAM needs a gradient through the head, so the detection members keep tiny weights (1e-4: their
    DenseNet features are small enough that the bias still decides to within 0.01).
    """
    head = classifier.get_classifier()
    with torch.no_grad():
        head.weight.mul_(scale)
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))


def build_and_save(bundle_dir: Path, set_heads) -> None:
    from ctcovid.bundle.loading import read_bundle_config

    torch.manual_seed(0)
    net = read_bundle_config(bundle_dir).get_parsed_content("network_def")
    set_heads(net)
    torch.save(net.state_dict(), bundle_dir / "models" / "model.pt")


@pytest.fixture(scope="session")
def test_bundles(tmp_path_factory) -> Path:
    """Bundle folder: shipped segmenter + tiny detection/severity ensembles with set heads; no slice filter."""
    seg_weights = bundles_root() / SEG_BUNDLE / "models" / "model.pt"
    if not seg_weights.is_file():
        pytest.skip(f"the lung segmenter has no shipped weights yet ({seg_weights})")
    root = tmp_path_factory.mktemp("bundles")
    shutil.copytree(bundles_root() / SEG_BUNDLE, root / SEG_BUNDLE)
    copy_configs(FILTER_BUNDLE, root)  # configs only: the mask-area rule decides
    if (bundles_root() / INFECTION_BUNDLE / "models" / "model.pt").is_file():
        shutil.copytree(bundles_root() / INFECTION_BUNDLE, root / INFECTION_BUNDLE)
    else:
        copy_configs(INFECTION_BUNDLE, root)  # the stage is then skipped, as on a checkout without weights
    det = copy_configs(DET_BUNDLE, root, {"num_members": 2, "depth": 8, "spatial_size": [64, 64]})

    def det_heads(net):
        for member, b in zip(net.members, DET_BIASES):
            set_head(member.backbone, [0.0, b], scale=1e-4)

    build_and_save(det, det_heads)
    sev = copy_configs(
        SEV_BUNDLE,
        root,
        {"backbones": ["inception_v3"], "repeats": 1, "depths": [4, 4], "spatial_size": [80, 80]},
    )

    def sev_heads(net):
        for member in net.members:
            set_head(member.backbone, SEV_BIAS)

    build_and_save(sev, sev_heads)
    return root


@pytest.fixture(scope="session")
def pipeline(test_bundles):
    from ctcovid.ct import CTCovidPipeline

    return CTCovidPipeline(bundle_dir=test_bundles, device="cpu", batch_size=8, severity="always")


@pytest.fixture(scope="session")
def fast_pipeline(pipeline):
    """The same loaded networks without Grad-CAM and severity: for tests about batches, not about outputs."""
    fast = copy.copy(pipeline)
    fast.use_gradcam = False
    fast.severity_mode = "never"
    return fast
