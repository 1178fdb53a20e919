"""Training-side helpers the X-ray bundles rely on: balanced sampling weights, confidence intervals of small
held-out sets, and the choice of training arithmetic per device."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ctcovid.metrics import auc_ci_by_patient, proportion_ci
from ctcovid.training import autocast, default_precision, native_bf16
from ctcovid.training.splits import class_weights, sample_weights


def _draw_shares(items, weights, n=60000):
    idx = torch.multinomial(torch.tensor(weights), n, replacement=True, generator=torch.Generator().manual_seed(0))
    counts = Counter((items[i]["label"], items[i]["domain"]) for i in idx.tolist())
    return {k: v / n for k, v in counts.items()}


def test_sample_weights_balance_classes_then_domains_within_a_class():
    items = [{"label": 0, "domain": "child"}] * 60 + [{"label": 0, "domain": "adult"}] * 4 + [
        {"label": 1, "domain": "adult"}
    ] * 16
    # classes only: the old behaviour, the inverse-frequency class weight per item
    assert sample_weights(items, 2) == [class_weights(items, 2)[it["label"]] for it in items]
    shares = _draw_shares(items, sample_weights(items, 2))
    assert shares[(0, "child")] == pytest.approx(0.5 * 60 / 64, abs=0.01)
    # within="domain": the 4 adult negatives are drawn as often as the 60 children
    shares = _draw_shares(items, sample_weights(items, 2, within="domain"))
    assert shares[(0, "child")] == pytest.approx(0.25, abs=0.01)
    assert shares[(0, "adult")] == pytest.approx(0.25, abs=0.01)
    assert shares[(1, "adult")] == pytest.approx(0.5, abs=0.01)


def test_proportion_ci_is_the_wilson_interval():
    assert proportion_ci(0, 0) is None
    low, high = proportion_ci(40, 44)
    # Wilson by its formula, z = 1.96
    p, n, z = 40 / 44, 44, 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (low, high) == pytest.approx((centre - half, centre + half), abs=1e-4)
    assert proportion_ci(10, 10)[1] == 1.0 and proportion_ci(10, 10)[0] < 1.0


def test_auc_ci_by_patient_brackets_the_auc_and_resamples_patients():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 40)
    s = y * 0.8 + rng.normal(0, 0.6, 80)
    patients = [f"p{i // 2}" for i in range(80)]  # two films per patient
    auc = roc_auc_score(y, s)
    low, high = auc_ci_by_patient(y, s, patients)
    assert low < auc < high and 0.5 < low and high <= 1.0
    # the same films counted as 80 independent patients give a narrower interval than 40 pairs of copies
    dup = np.repeat(s[::2], 2)
    w_pairs = np.diff(auc_ci_by_patient(y, dup, patients))[0]
    w_indep = np.diff(auc_ci_by_patient(y, dup, [str(i) for i in range(80)]))[0]
    assert w_pairs > w_indep
    assert auc_ci_by_patient([1, 1], [0.2, 0.3], ["a", "b"]) is None


def test_default_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not native_bf16("cpu") and default_precision("cpu") == "fp32"  # emulated bf16: 12x slower measured
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert native_bf16("cpu") and default_precision("cpu") == "bf16"
    # CUDA keeps fp32 here: the configs' amp (fp16 autocast + grad scaler) handles it
    assert default_precision(torch.device("cuda", 0)) == "fp32"
    assert autocast.autocast_network(torch.nn.Linear(2, 2), default_precision("cpu")).dtype == torch.bfloat16
