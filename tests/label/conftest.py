"""Fixtures of the MONAI Label app tests (``tox -e label``).

Every test here is skipped when ``monailabel`` is not installed (the main environment has pydicom 3,
which monailabel 0.8.5 does not support): collection imports nothing heavy, so the main ``pytest`` run
pays nothing for this folder.

The server tests share one real server (``monailabel start_server`` in a subprocess on a free
127.0.0.1 port) over a temporary studies folder of real CT studies from ``../shared/data`` (symlinked,
never copied into the repository) and a temporary bundle folder:

- ``ct_lung_segmentation``: the shipped weights when the bundle has them; until then a stand-in
  checkpoint that marks every pixel lung (plumbing only: the mask-quality assertion is skipped, with the
  reason);
- ``ct_covid_classification`` / ``ct_covid_severity_classification``: no weights ship, so the temporary
  copies get random-weight checkpoints with one member (``num_members: 1``; ``backbones:
  [inception_v3], repeats: 1``: fewer members, same member architecture) so the JSON plumbing is
  exercised; the no-weights answer is tested on a bare copy without a server;
- ``ct_lung_slice_filter``: no weights (optional stage: the lung-mask area decides).
- ``ct_lung_infection_segmentation``: the shipped weights (like the lung segmenter).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, data_path

HAVE_MONAILABEL = importlib.util.find_spec("monailabel") is not None
CT_BUNDLES = (
    "ct_lung_slice_filter",
    "ct_lung_segmentation",
    "ct_covid_classification",
    "ct_covid_severity_classification",
    "ct_lung_infection_segmentation",
)
#: Bundles whose shipped trained weights the servers use (linked, never copied).
SHIPPED_WEIGHTS = ("ct_lung_segmentation", "ct_lung_infection_segmentation")
#: Per-bundle overrides written into the temporary ``inference.json`` copies (fewer ensemble members).
SMALL_ENSEMBLES = {
    "ct_covid_classification": {"num_members": 1},
    "ct_covid_severity_classification": {"backbones": ["inception_v3"], "repeats": 1},
}
START_TIMEOUT_S = 240


@pytest.fixture(scope="session", autouse=True)
def _require_monailabel():
    # session-scoped so that it runs before (and so skips) the session fixtures below
    if not HAVE_MONAILABEL:
        pytest.skip("monailabel is not installed: run these with `tox -e label` (pip install -e '.[label,test]')")


def _shipped_bundles() -> Path:
    return PROJECT_ROOT / "bundles"


def shipped_segmenter_weights(bundle: str = "ct_lung_segmentation") -> Path | None:
    w = _shipped_bundles() / bundle / "models" / "model.pt"
    return w if w.is_file() else None


def _save_random_weights(bundle: Path, seed: int, lung_everywhere: bool = False) -> None:
    """Build the bundle's ``network_def`` from its ``inference.json`` and save its fresh state dict.

    ``lung_everywhere`` (the segmenter stand-in before trained weights exist): the output convolution
    answers "lung" for every pixel, so the stages after segmentation always get lung slices; a purely
    random segmenter finds lung on no slice or every slice depending on the draw.
    """
    import torch

    from ctcovid.bundle.loading import read_bundle_config

    torch.manual_seed(seed)
    net = read_bundle_config(bundle).get_parsed_content("network_def", instantiate=True)
    if lung_everywhere:
        out = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            out.weight.zero_()
            out.bias.copy_(torch.tensor([0.0, 1.0]))
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), bundle / "models" / "model.pt")


def make_bundle_root(dest: Path, weights: tuple[str, ...] = CT_BUNDLES[1:]) -> Path:
    """Copy the CT bundles' configs into ``dest`` and add the checkpoints described above to ``weights``."""
    for name in CT_BUNDLES:
        src = _shipped_bundles() / name
        out = dest / name
        shutil.copytree(src / "configs", out / "configs")
        (out / "models").mkdir(parents=True)
        overrides = SMALL_ENSEMBLES.get(name)
        if overrides:
            cfg_file = out / "configs" / "inference.json"
            cfg = json.loads(cfg_file.read_text())
            cfg.update(overrides)
            cfg_file.write_text(json.dumps(cfg, indent=1))
        if name not in weights:
            continue
        if name in SHIPPED_WEIGHTS:
            shipped = shipped_segmenter_weights(name)
            if shipped is not None:
                os.symlink(shipped, out / "models" / "model.pt")
            else:
                _save_random_weights(out, seed=0, lung_everywhere=True)
        elif overrides:
            _save_random_weights(out, seed=1)
    return dest


@pytest.fixture(scope="session")
def segmenter_only_bundles(_require_monailabel, tmp_path_factory) -> Path:
    """Lung segmenter weights only: detection and severity as a fresh checkout ships them (no weights)."""
    return make_bundle_root(tmp_path_factory.mktemp("segmenter_only_bundles"), weights=("ct_lung_segmentation",))


@pytest.fixture(scope="session")
def label_bundles(_require_monailabel, tmp_path_factory) -> Path:
    """Weights for the segmenter, detection and severity (see the module docstring)."""
    return make_bundle_root(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def studies(_require_monailabel, tmp_path_factory) -> Path:
    """Studies folder: three NIfTI CTs, one chest DICOM series folder and a truncated (corrupt) NIfTI.

    MedSeg ``rp4`` (13.8 % of its lung infected; held out from the lesion model's training) is the study for
    the lesion model.

    The DICOM series is the middle 40 slices (by position) of COVID-CT-MD ``normal002`` (JPEG lossless,
    file names not in anatomical order), linked file by file: a real hospital series, a quarter of the
    segmentation time of all 167 slices.
    """
    import pydicom

    ct_sm = data_path("fixtures", "totalsegmentator_example_ct", "example_ct_sm.nii.gz")
    rp6 = data_path("ct", "medseg", "images", "rp6.nii.gz")
    series = data_path("ct", "covid_ct_md", "normal002")
    root = tmp_path_factory.mktemp("studies")
    os.symlink(ct_sm, root / "totalseg_ct_sm.nii.gz")
    os.symlink(rp6, root / "medseg_rp6.nii.gz")
    os.symlink(data_path("ct", "medseg", "images", "rp4.nii.gz"), root / "medseg_rp4.nii.gz")
    by_z = sorted(
        (float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]), f)
        for f in series.iterdir()
        if f.is_file()
    )
    middle = len(by_z) // 2
    (root / "covid_ct_md_normal002").mkdir()
    for _, f in by_z[middle - 20 : middle + 20]:
        os.symlink(f, root / "covid_ct_md_normal002" / f.name)
    (root / "corrupt.nii.gz").write_bytes(ct_sm.read_bytes()[:3000])  # cut inside the gzip stream
    return root


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running ``monailabel start_server`` subprocess and where it lives."""

    def __init__(self, url: str, app: Path, studies: Path, bundles: Path, proc: subprocess.Popen, log: Path):
        self.url, self.app, self.studies, self.bundles, self.proc, self.log = url, app, studies, bundles, proc, log

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _stop(proc: subprocess.Popen) -> list[int]:
    """Terminate the server and its children (a training subprocess); return pids still alive after."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    for c in children:
        try:
            c.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=15)
    for c in alive:
        c.kill()
    _, alive = psutil.wait_procs(alive, timeout=15)
    return [c.pid for c in alive]


@pytest.fixture(scope="session")
def server(_require_monailabel, tmp_path_factory, studies, label_bundles) -> Server:
    """A real MONAI Label server on a free loopback port, stopped (no orphan process) at the end."""
    import requests

    from ctcovid.cli.main import main as ctcovid_main

    app = tmp_path_factory.mktemp("app")
    assert ctcovid_main(["label-app", "--copy-to", str(app)]) == 0
    port = _free_port()
    log = app / "server.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        # offline: any download attempt goes to a dead proxy and fails at once; loopback stays direct
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
        "PYTHONPATH": str(PROJECT_ROOT),
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    cmd = [
        sys.executable, "-m", "monailabel.main", "start_server",
        "--app", str(app), "--studies", str(studies),
        "--host", "127.0.0.1", "--port", str(port),
        "--conf", "bundle_dir", str(label_bundles),
        "--conf", "severity", "always",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=app)
    srv = Server(f"http://127.0.0.1:{port}", app, studies, label_bundles, proc, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} during start-up:\n{srv.log_tail()}")
            try:
                if requests.get(f"{srv.url}/info/", timeout=10).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after {START_TIMEOUT_S} s:\n{srv.log_tail()}")
            time.sleep(1.0)
        yield srv
    finally:
        alive = _stop(proc)
        assert proc.returncode is not None, "server process still running"
        assert not alive, f"processes left behind by the server: {alive}"
