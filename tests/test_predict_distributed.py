"""``torchrun ... -m ctcovid predict``: sharding rule, summary merge, and a real 2-process Gloo run.

The sharding and merge tests are pure. One test launches ``torchrun --nproc_per_node 2`` twice on four
small synthetic scans (two NIfTI, one DICOM series, one broken file) on the CPU: the first run processes
them, the second resumes.
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT_ROOT

from ctcovid.ct.result import CTResult
from ctcovid.io.atomic import write_csv_atomic
from ctcovid.running.batch import SUMMARY_NAME, summary_columns
from ctcovid.running.distributed import (
    backend_for,
    merge_partial_summaries,
    partial_summary_name,
    rank_device,
    shard_by_cost,
    torchrun_world,
)
from ctcovid.running.scans import ScanInput

SUMMARY_FIELDS = CTResult.SUMMARY_FIELDS


# ---------------------------------------------------------------------------------------------- sharding
def test_shard_by_cost_worked_example():
    # by decreasing cost: 0 (5) -> r0, 2 (4) -> r1, 4 (3) -> r1 (4 < 5), 3 (2) -> r0 (5 < 7),
    # 1 (1) -> r0 (7 = 7 and 2 scans each: lower rank); shards back in input order
    assert shard_by_cost([5, 1, 4, 2, 3], 2) == [[0, 1, 3], [2, 4]]
    assert shard_by_cost([], 3) == [[], [], []]
    assert shard_by_cost([7], 3) == [[0], [], []]
    with pytest.raises(ValueError):
        shard_by_cost([1], 0)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shard_by_cost_covers_once_deterministic_balanced(world_size):
    rng = random.Random(world_size)
    costs = [rng.choice([0, 1, 40, 500, 2_000, 90_000]) * rng.randint(1, 9) for _ in range(101)]
    shards = shard_by_cost(costs, world_size)
    assert len(shards) == world_size
    assert sorted(i for s in shards for i in s) == list(range(len(costs)))  # every scan exactly once
    assert all(s == sorted(s) for s in shards)  # each rank works in input order
    assert shard_by_cost(list(costs), world_size) == shards  # deterministic
    loads = [sum(costs[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(costs)  # greedy bound: within one scan's cost
    # a round-robin split (rank::world) of the same scans is far less even here
    naive = [sum(costs[r::world_size]) for r in range(world_size)]
    assert max(loads) - min(loads) <= max(naive) - min(naive)


def test_equal_or_unknown_costs_deal_out_round_robin():
    for costs in ([0] * 7, [3] * 7):  # unreadable inputs (cost 0) must not all land on rank 0
        shards = shard_by_cost(costs, 3)
        assert shards == [[0, 3, 6], [1, 4], [2, 5]]


def test_torchrun_world_and_devices():
    assert torchrun_world({}) is None
    assert torchrun_world({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None  # plain run
    assert torchrun_world({"WORLD_SIZE": "4"}) is None  # no RANK: not a torchrun worker
    world = torchrun_world({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (world.rank, world.local_rank, world.world_size, world.is_main) == (3, 1, 4, False)
    assert rank_device("cpu", world) == "cpu" and backend_for("cpu", 1) == "gloo"
    assert backend_for("cuda:0", 1) == "gloo"  # a GPU shared with rank 0: NCCL would refuse it
    assert backend_for("not-a-device", 1) == "gloo"
    import torch

    if not torch.cuda.is_available():
        assert rank_device("auto", world) == "cpu"
    elif torch.cuda.device_count() > 1:
        assert rank_device("auto", world) == rank_device("cuda", world) == "cuda:1"
        assert backend_for("cuda:1", 1) == "nccl"


# ----------------------------------------------------------------------------------------------- merging
def test_merge_matches_single_process_summary(tmp_path):
    """Merged partials are byte-identical to the summary one process writes for the same rows."""
    scans = [ScanInput(tmp_path / f"s{i}.nii.gz", f"s{i}") for i in range(5)]

    def row(i, graded):
        r = {k: None for k in SUMMARY_FIELDS} | {"scan_id": f"s{i}", "path": str(scans[i].path)}
        r |= {"status": "ok", "reused": i % 2 == 0, "slices_read": 10 + i, "covid_probability": 0.25 * (i % 4)}
        if graded:
            r |= {"p_mild": 0.1, "p_moderate": 0.2, "p_severe": 0.3, "p_critical": 0.4}
        return r

    rows = [row(0, False), row(1, False), row(2, True), row(3, False), row(4, True)]
    rows[3] |= {"status": "failed", "reason": 'unreadable, "quoted"\nsecond line', "slices_read": None}

    def fields(rs):  # the columns run_batch writes for these rows
        return summary_columns(SUMMARY_FIELDS, rs)

    write_csv_atomic(rows, fields(rows), tmp_path / "single.csv")
    out = tmp_path / "out"
    shards = [[0, 2, 3], [1, 4], []]  # rank 2 had nothing to do
    for r, shard in enumerate(shards):
        part = [rows[i] for i in shard]
        write_csv_atomic(part, fields(part), out / partial_summary_name(r))
    stale = row(1, True) | {"status": "failed"}  # left by a killed run with more ranks: not merged
    write_csv_atomic([stale], fields([stale]), out / partial_summary_name(7))
    merged = merge_partial_summaries(out, scans, world_size=3, fields=SUMMARY_FIELDS)
    assert [r["scan_id"] for r in merged] == [s.scan_id for s in scans]
    assert (out / SUMMARY_NAME).read_bytes() == (tmp_path / "single.csv").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [SUMMARY_NAME]  # partials (stale one too) removed
    assert merge_partial_summaries(tmp_path / "nothing_ran", scans, world_size=3, fields=SUMMARY_FIELDS) is None


# ------------------------------------------------------------------------------------ torchrun, 2 ranks
def _phantom_hu(n: int, depth: int, seed: int) -> np.ndarray:
    """(n, n, depth) int16 HU: air, a soft-tissue body ellipse and two dark lung ellipses."""
    yy, xx = np.mgrid[:n, :n] / n
    body = ((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.35) ** 2 <= 1
    lungs = (((xx - 0.3) / 0.13) ** 2 + ((yy - 0.5) / 0.22) ** 2 <= 1) | (
        ((xx - 0.7) / 0.13) ** 2 + ((yy - 0.5) / 0.22) ** 2 <= 1
    )
    hu = np.where(body, 40.0, -1000.0)
    hu[lungs] = -850.0
    noise = np.random.default_rng(seed).normal(0, 10, (n, n, depth))
    return (hu[..., None] + noise).astype(np.int16)


def _write_nifti(path: Path, hu: np.ndarray) -> None:
    import nibabel as nib

    n = hu.shape[0]
    nib.save(nib.Nifti1Image(hu, np.diag([300.0 / n, 300.0 / n, 5.0, 1.0])), path)


def _write_dicom_series(folder: Path, hu: np.ndarray) -> None:
    """A minimal CT series: one file per slice, HU = stored value - 1024."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    from ctcovid.io.pydicom_compat import save_dataset

    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    rows, cols, depth = hu.shape[1], hu.shape[0], hu.shape[2]
    for k in range(depth):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.InstanceNumber = "synthetic", k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [300.0 / cols, 300.0 / rows], 5.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (hu[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        save_dataset(ds, folder / f"IM{k:04d}.dcm")


def _torchrun(args: list[str], tmp_path: Path, wrap_exit_codes: bool) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m ctcovid ARGS`` on the CPU (``python -m
    torch.distributed.run`` is what the ``torchrun`` script runs). With ``wrap_exit_codes`` each rank runs
    under ``sh``, which records the rank's exit code in ``exit.<rank>`` and exits 0, so that torchrun does
    not stop the other rank when the first one exits non-zero."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if wrap_exit_codes:
        script = '"$0" -m ctcovid "$@"; echo $? > "$EXIT_DIR/exit.$RANK"'
        cmd = [*launcher, "--no-python", "sh", "-c", script, sys.executable, *args]
    else:
        cmd = [*launcher, "-m", "ctcovid", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "EXIT_DIR": str(tmp_path)}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)


def _summary(out: Path) -> list[tuple[str, str, str]]:
    with open(out / SUMMARY_NAME, newline="") as f:
        return [(r["scan_id"], r["status"], r["reused"]) for r in csv.DictReader(f)]


def test_torchrun_two_ranks_shard_merge_exit_code_and_resume(seg_only_bundles, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    _write_dicom_series(scans / "series_c", _phantom_hu(48, 3, seed=2))
    _write_nifti(scans / "vol_a.nii.gz", _phantom_hu(64, 4, seed=0))
    (scans / "broken.nii.gz").write_bytes(b"not a NIfTI file at all")
    _write_nifti(scans / "vol_b.nii.gz", _phantom_hu(40, 3, seed=1))
    order = ["series_c", "broken", "vol_b", "vol_a"]  # neither alphabetical nor the shard order
    inputs = [str(scans / n) for n in ("series_c", "broken.nii.gz", "vol_b.nii.gz", "vol_a.nii.gz")]
    out = tmp_path / "out"
    args = ["predict", *inputs, "--out", str(out), "--device", "cpu", "--bundle-dir", str(seg_only_bundles)]
    args += ["--skip-missing", "--no-gradcam", "--no-progress", "--workers", "0"]

    first = _torchrun(args, tmp_path, wrap_exit_codes=True)
    log = first.stdout + first.stderr
    codes = {r: (tmp_path / f"exit.{r}").read_text().strip() for r in (0, 1)}
    assert codes == {0: "1", 1: "1"}, log  # EXIT_SCANS_FAILED on both ranks: the failure was on one
    assert "distributed run: 4 scan(s) over 2 ranks (gloo)" in log, log
    assert "all 2 ranks: 4 scan(s): 3 ok (0 reused from an earlier run), 1 failed" in log, log
    assert _summary(out) == [(n, "failed" if n == "broken" else "ok", "False") for n in order]
    files = sorted(p.name for p in out.iterdir())
    assert [f for f in files if f.endswith(".json")] == sorted(f"{n}.json" for n in order)  # one each
    assert not [f for f in files if f.startswith("summary.rank") or f.startswith(".")]  # no partial, no tmp
    assert {f"{n}_lung_mask.nii.gz" for n in order if n != "broken"} <= set(files)

    # the documented command itself, again: done scans are skipped, the broken one is retried and fails
    second = _torchrun(args, tmp_path, wrap_exit_codes=False)
    log = second.stdout + second.stderr
    assert second.returncode != 0, log  # torchrun reports a failed rank by its own non-zero exit
    assert "all 2 ranks: 4 scan(s): 3 ok (3 reused from an earlier run), 1 failed" in log, log
    assert _summary(out) == [(n, "failed", "False") if n == "broken" else (n, "ok", "True") for n in order]
    assert not list(out.glob("summary.rank*.csv"))
