"""Half-precision weight files (what keeps SEME-ResNet50 under the repository's file size limit) load as float32
and give the network's outputs to within the rounding."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import PROJECT_ROOT

from ctcovid.bundle.loading import load_stage
from ctcovid.training.export_weights import export_weights, main

BUNDLE = "cxr_lung_segmentation"  # small shipped float32 weights


@pytest.fixture
def bundle_copy(tmp_path):
    src = PROJECT_ROOT / "bundles" / BUNDLE
    dest = tmp_path / "bundles" / BUNDLE
    shutil.copytree(src / "configs", dest / "configs")
    return dest, src / "models" / "model.pt"


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_file_loads_as_float32_with_the_rounded_values(bundle_copy, dtype, torch_dtype):
    dest, weights = bundle_copy
    report = export_weights(weights, dest, dtype=dtype, input_shape=(1, 1, 128, 128))
    stored = torch.load(dest / "models" / "model.pt", map_location="cpu", weights_only=True)
    original = torch.load(weights, map_location="cpu", weights_only=True)
    floats = [k for k, v in original.items() if v.is_floating_point()]
    assert floats and all(stored[k].dtype == torch_dtype for k in floats)
    assert report["bytes"] < 0.6 * weights.stat().st_size  # half the float32 file, plus pickle overhead

    network = load_stage("lung segmentation", BUNDLE, dest.parent).network
    params = dict(network.named_parameters())
    for k in floats:
        if k in params:
            assert params[k].dtype == torch.float32
            torch.testing.assert_close(params[k].detach(), original[k].to(torch_dtype).float())
    # the rounding moves the logits a little, not the answer
    assert 0 < report["max_abs_output_diff"] < (0.05 if dtype == "fp16" else 0.5)


def test_fp32_export_is_lossless_and_the_command_line_reports(bundle_copy, capsys):
    dest, weights = bundle_copy
    assert main([str(weights), str(dest), "--dtype", "fp32", "--input-shape", "1", "1", "64", "64"]) == 0
    out = capsys.readouterr().out
    assert '"max_abs_output_diff": 0.0' in out
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_weights(weights, dest, dtype="int8")


def test_second_variant_file_is_checked_with_its_own_network(tmp_path):
    """A bundle with two variants (ResNet-18 / CBAM-ResNet-18): --model-file names the file and --set builds the
    variant's network for the check; without the override the CBAM weights do not fit the plain network."""
    from ctcovid.networks import ResNet18Classifier

    name = "cxr_covid_resnet18_classification"
    dest = tmp_path / name
    shutil.copytree(PROJECT_ROOT / "bundles" / name / "configs", dest / "configs")
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": ResNet18Classifier(in_channels=1, num_classes=2, cbam=True).state_dict()}, ckpt)
    args = [str(ckpt), str(dest), "--model-file", "model_cbam.pt", "--input-shape", "1", "1", "64", "64"]
    assert main(args + ["--set", "use_cbam=true"]) == 0
    assert (dest / "models" / "model_cbam.pt").is_file() and not (dest / "models" / "model.pt").exists()
    with pytest.raises(RuntimeError, match="cbam"):
        main(args)
