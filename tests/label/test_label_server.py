"""A real MONAI Label server running the app: the REST calls the 3D Slicer module makes.

One server for the module (``server`` fixture in ``conftest.py``). The tests run in file order; the
training test is last because it changes the segmenter's weights.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import data_path

REQUEST_TIMEOUT_S = 300
TRAIN_TIMEOUT_S = 420
SEVERITY_CLASSES = {"mild", "moderate", "severe", "critical"}


def _post(server, path: str, **kw):
    import requests

    return requests.post(f"{server.url}{path}", timeout=REQUEST_TIMEOUT_S, **kw)


def _get(server, path: str, **kw):
    import requests

    return requests.get(f"{server.url}{path}", timeout=60, **kw)


def _infer(server, model: str, image: str, **params):
    return _post(server, f"/infer/{model}", params={"image": image, **params})


def _split_multipart(resp, tmp_path: Path):
    """``(params JSON, label NIfTI)`` from an ``/infer`` multipart answer."""
    import nibabel as nib
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    assert resp.status_code == 200, resp.text[:500]
    params, image = None, None
    for part in MultipartDecoder.from_response(resp).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            params = json.loads(part.text)
        elif 'name="image"' in disposition:
            out = tmp_path / f"mask_{time.monotonic_ns()}.nii.gz"
            out.write_bytes(part.content)
            image = nib.load(out)
    assert params is not None and image is not None, "answer lacks the params or the label file"
    return params, image


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def rp6_answer(server, tmp_path_factory):
    """``lung_segmentation`` on the MedSeg rp6 study, asked once for the tests that check it."""
    return _split_multipart(_infer(server, "lung_segmentation", "medseg_rp6"), tmp_path_factory.mktemp("rp6"))


def test_info_lists_the_models_for_slicer(server):
    r = _get(server, "/info/")
    assert r.status_code == 200
    info = r.json()
    models = info["models"]
    assert models["lung_segmentation"]["type"] == "segmentation"  # what the Slicer module lists
    assert models["lung_segmentation"]["labels"] == {"lung": 1}
    assert models["covid_detection"]["type"] == models["covid_severity"]["type"] == "classification"
    assert models["covid_severity"]["labels"] == ["mild", "moderate", "severe", "critical"]
    assert models["lung_infection_segmentation"]["type"] == "segmentation"
    assert models["lung_infection_segmentation"]["labels"] == {"lung": 1, "infection": 2}
    assert set(info["trainers"]) == {"lung_segmentation", "lung_infection_segmentation"}
    assert info["datastore"]["total"] == 5  # 3 NIfTI studies + the converted DICOM series + the corrupt file
    assert info["datastore"]["dicom_series"] == {"covid_ct_md_normal002": "converted"}
    stages = info["ctcovid"]["stages"]
    assert stages["slice_filter"]["weights"] is False
    assert "lung-mask area" in stages["slice_filter"]["message"]
    assert all(stages[s]["weights"] for s in ("segmentation", "detection", "severity", "infection"))
    # offline start-up: the server runs behind a dead proxy (conftest); nothing tried to download
    log = server.log.read_text(errors="replace").lower()
    assert "download" not in log and "proxyerror" not in log


def test_lung_segmentation_returns_mask_in_study_geometry_and_probabilities(server, rp6_answer):
    import nibabel as nib

    params, mask = rp6_answer
    study = nib.load(data_path("ct", "medseg", "images", "rp6.nii.gz"))
    assert mask.shape == study.shape
    np.testing.assert_allclose(mask.affine, study.affine, atol=1e-4)
    values = np.asarray(mask.dataobj)
    assert set(np.unique(values)) <= {0, 1}
    # the JSON describes this very mask
    voxel_ml = float(np.prod(study.header.get_zooms()[:3])) / 1000.0
    assert params["lung_volume_ml"] == pytest.approx(int(values.sum()) * voxel_ml, rel=1e-4)
    assert params["label_names"] == {"lung": 1}

    members = params["covid_member_probabilities"]
    assert 0.0 <= params["covid_probability"] <= 1.0
    assert params["covid_probability"] == pytest.approx(float(np.mean(members)), abs=1e-6)
    assert params["covid_probability_spread"] == pytest.approx(float(np.std(members)), abs=1e-6)
    assert params["prediction"] == ("COVID-19" if params["covid_probability"] >= 0.5 else "non-COVID-19")
    probs = params["severity_probabilities"]
    assert set(probs) == SEVERITY_CLASSES
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert params["severity"] == max(probs, key=probs.get)
    assert params["reasons"] == {}
    assert params["record"]["scan"]["shape"] == list(study.shape)


def test_lung_mask_matches_the_reference_lung_mask(rp6_answer):
    """rp6 is in the lung segmenter's test split: its Dice against the MedSeg lung mask."""
    import nibabel as nib

    from label.conftest import shipped_segmenter_weights

    if shipped_segmenter_weights() is None:
        pytest.skip("bundles/ct_lung_segmentation has no trained weights yet: the server ran a stand-in segmenter")
    _, mask = rp6_answer
    ref = np.asarray(nib.load(data_path("ct", "medseg", "lung_masks", "rp6.nii.gz")).dataobj) > 0
    pred = np.asarray(mask.dataobj) > 0
    dice = 2.0 * np.logical_and(ref, pred).sum() / (ref.sum() + pred.sum())
    assert dice > 0.85, f"Dice {dice:.3f} against the reference lung mask"


def test_lung_infection_segmentation_returns_lung_and_lesions_with_involvement(server, tmp_path):
    """rp4 is held out from the lesion model's training: label map, JSON consistent with it, Dice (its
    diffuse ground glass is under-read: bundles/ct_lung_infection_segmentation/docs/README.md)."""
    import nibabel as nib

    params, labels = _split_multipart(_infer(server, "lung_infection_segmentation", "medseg_rp4"), tmp_path)
    study = nib.load(data_path("ct", "medseg", "images", "rp4.nii.gz"))
    assert labels.shape == study.shape
    np.testing.assert_allclose(labels.affine, study.affine, atol=1e-4)
    values = np.asarray(labels.dataobj)
    assert set(np.unique(values)) == {0, 1, 2}
    assert params["label_names"] == {"lung": 1, "infection": 2}
    lesion, lung = values == 2, values > 0
    assert params["lung_involvement_percent"] == pytest.approx(100.0 * lesion.sum() / lung.sum(), rel=1e-4)
    assert params["ct_severity_grade"] in {"CT-1", "CT-2"} and params["ct_severity_source"] == "involvement"
    assert set(params["lungs"]) == {"right", "left"}
    ref = np.asarray(nib.load(data_path("ct", "medseg", "infection_masks", "rp4.nii.gz")).dataobj) > 0
    dice = 2.0 * np.logical_and(ref, lesion).sum() / (ref.sum() + lesion.sum())
    assert dice > 0.2, f"lesion Dice {dice:.3f} against the MedSeg reference on held-out rp4 (measured 0.28)"


def test_classification_models_answer_json(server):
    r = _infer(server, "covid_detection", "totalseg_ct_sm")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    det = r.json()
    assert det["available"] is True and det["reason"] is None
    assert 0.0 <= det["covid_probability"] <= 1.0
    assert det["prediction"] == ("COVID-19" if det["covid_probability"] >= det["threshold"] else "non-COVID-19")
    assert det["record"]["scan"]["shape"] == [122, 101, 30]

    r = _infer(server, "covid_severity", "totalseg_ct_sm")
    assert r.status_code == 200
    sev = r.json()
    assert sev["available"] is True
    assert set(sev["probabilities"]) == SEVERITY_CLASSES
    assert sum(sev["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert sev["grade"] == max(sev["probabilities"], key=sev["probabilities"].get)
    assert sev["covid_probability"] == pytest.approx(det["covid_probability"], abs=1e-6)  # same scan, same model
    assert det["cached"] is False and sev["cached"] is True  # both answers from one pipeline run


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(server, tmp_path):
    r = _infer(server, "lung_segmentation", "no_such_study")
    assert r.status_code == 404 and "unknown image id 'no_such_study'" in r.json()["detail"]

    r = _infer(server, "no_such_model", "totalseg_ct_sm")
    assert r.status_code == 404 and "unknown model 'no_such_model'" in r.json()["detail"]

    r = _infer(server, "lung_segmentation", "corrupt")
    assert r.status_code == 422
    assert "corrupt.nii.gz" in r.json()["detail"] and "cannot be read" in r.json()["detail"]

    r = _post(server, "/train/no_such_model", json={})
    assert r.status_code == 404 and "unknown model 'no_such_model'" in r.json()["detail"]

    import requests

    wrong_grid = data_path("ct", "medseg", "lung_masks", "rp6.nii.gz")
    with open(wrong_grid, "rb") as f:
        r = requests.put(f"{server.url}/datastore/label", params={"image": "totalseg_ct_sm", "tag": "final"},
                         files={"label": ("label.nii.gz", f)}, timeout=60)
    assert r.status_code == 422 and "differs from the image's" in r.json()["detail"]
    with open(wrong_grid, "rb") as f:
        r = requests.put(f"{server.url}/datastore/label", params={"image": "no_such_study", "tag": "final"},
                         files={"label": ("label.nii.gz", f)}, timeout=60)
    assert r.status_code == 404 and "unknown image id" in r.json()["detail"]
    r = requests.put(f"{server.url}/datastore/label", params={"image": "totalseg_ct_sm", "tag": "final"},
                     files={"label": ("label.nrrd", b"NRRD0004\n")}, timeout=60)
    assert r.status_code == 422 and "not NIfTI" in r.json()["detail"]

    assert _get(server, "/info/").status_code == 200
    assert server.proc.poll() is None
    labels = _get(server, "/datastore/", params={"output": "all"}).json()["objects"]
    assert not labels["totalseg_ct_sm"]["labels"]  # nothing bad was saved


def _write_nifti(path: Path, shape: tuple[int, ...]) -> Path:
    import nibabel as nib

    data = np.random.default_rng(0).integers(-1000, 400, size=shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))
    return path


def test_image_is_only_ever_a_study_id_never_a_server_path(server, tmp_path):
    # a readable CT on the server's disk, outside the studies folder: must not be segmented, and the answer
    # must not tell whether it exists (same answer as for a path that does not)
    outside = _write_nifti(tmp_path / "outside.nii.gz", (32, 32, 8))
    answers = {}
    for name, image in {
        "existing path": str(outside),
        "missing path": str(tmp_path / "missing.nii.gz"),
        "traversal": "../" * 8 + str(outside).lstrip("/"),
        "study file path": str(server.studies / "medseg_rp6.nii.gz"),
    }.items():
        r = _infer(server, "lung_segmentation", image)
        answers[name] = r
        assert r.status_code == 404, (name, r.text[:300])
        assert "never server paths" in r.json()["detail"]
    # the same refusal when the path comes in the params JSON, which MONAI Label merges over ?image=
    r = _post(server, "/infer/lung_segmentation", params={"image": "medseg_rp6"},
              data={"params": json.dumps({"image": str(outside)})})
    assert r.status_code == 404 and "never server paths" in r.json()["detail"]
    assert "label" not in r.headers.get("content-type", "")
    # the 404 body differs only by the echoed name, so existence does not leak
    existing = answers["existing path"].json()["detail"].replace(str(outside), "X")
    missing = answers["missing path"].json()["detail"].replace(str(tmp_path / "missing.nii.gz"), "X")
    assert existing == missing


def test_uploads_that_are_not_a_readable_volume_are_refused_and_not_stored(server, tmp_path):
    import requests

    def put(image_id, filename, payload):
        params = {"image": image_id} if image_id is not None else {}
        return requests.put(f"{server.url}/datastore/", params=params, files={"file": (filename, payload)}, timeout=60)

    before = set(p.name for p in server.studies.iterdir())
    ct = data_path("fixtures", "totalsegmentator_example_ct", "example_ct_sm.nii.gz").read_bytes()
    cases = {
        "text named .nii.gz": (put("bad_text", "scan.nii.gz", b"this is not a volume\n" * 100), 422),
        "cut gzip stream": (put("bad_cut", "scan.nii.gz", ct[: len(ct) // 2]), 422),
        "not NIfTI": (put("bad_txt", "notes.txt", b"hello"), 415),
        "one DICOM file": (put("bad_dcm", "slice.dcm", b"\0" * 128 + b"DICM"), 415),
        "2D image": (put("bad_2d", "slice.nii.gz", _write_nifti(tmp_path / "flat.nii.gz", (64, 64)).read_bytes()), 422),
        "traversal id": (put("../../escaped", "scan.nii.gz", ct), 422),
        "hidden id": (put(".hidden", "scan.nii.gz", ct), 422),
    }
    for name, (r, status) in cases.items():
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert r.json()["detail"], name
    assert set(p.name for p in server.studies.iterdir()) == before  # nothing stored
    assert not (server.studies.parent / "escaped.nii.gz").exists()
    ids = set(_get(server, "/datastore/", params={"output": "all"}).json()["objects"])
    assert not {i for i in ids if i.startswith("bad_")}

    # a label tag names a folder: no traversal there either
    with open(data_path("ct", "medseg", "lung_masks", "rp6.nii.gz"), "rb") as f:
        r = requests.put(f"{server.url}/datastore/label", params={"image": "medseg_rp6", "tag": "../../x"},
                         files={"label": ("label.nii.gz", f)}, timeout=60)
    assert r.status_code == 422

    # a readable volume is stored under its id, can be removed again, and removing it twice is 404
    good = _write_nifti(tmp_path / "good.nii.gz", (48, 48, 12)).read_bytes()
    r = put("uploaded_ok", "good.nii.gz", good)
    assert r.status_code == 200, r.text[:300]
    assert (server.studies / "uploaded_ok.nii.gz").is_file()
    assert requests.delete(f"{server.url}/datastore/", params={"id": "uploaded_ok"}, timeout=60).status_code == 200
    assert requests.delete(f"{server.url}/datastore/", params={"id": "uploaded_ok"}, timeout=60).status_code == 404


def test_server_answers_a_burst_of_bad_requests_and_keeps_serving(server, tmp_path):
    import requests

    outside = str(_write_nifti(tmp_path / "outside.nii.gz", (16, 16, 4)))

    def bad(i: int):
        kind = i % 4
        if kind == 0:
            return _infer(server, "lung_segmentation", outside).status_code
        if kind == 1:
            return _infer(server, "lung_segmentation", f"no_such_study_{i}").status_code
        if kind == 2:
            return requests.put(f"{server.url}/datastore/", params={"image": f"junk_{i}"},
                                files={"file": ("x.nii.gz", b"junk" * 64)}, timeout=60).status_code
        return _infer(server, f"no_such_model_{i}", "medseg_rp6").status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(bad, range(64)))
    assert all(400 <= c < 500 for c in codes), codes
    assert _get(server, "/info/").status_code == 200
    assert server.proc.poll() is None
    ids = set(_get(server, "/datastore/", params={"output": "all"}).json()["objects"])
    assert not {i for i in ids if i.startswith("junk_")}


def test_concurrent_infer_requests_on_a_dicom_series_study_all_succeed(server, tmp_path):
    from ctcovid.io import load_ct

    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(lambda _: _infer(server, "lung_segmentation", "covid_ct_md_normal002"), range(3)))
    results = [_split_multipart(r, tmp_path) for r in answers]
    ref = load_ct(server.studies / "covid_ct_md_normal002")
    for params, mask in results:
        assert mask.shape == tuple(ref.shape[1:])  # the series' own voxel grid
        np.testing.assert_allclose(mask.affine, np.asarray(ref.meta["affine"]), atol=1e-3)
        assert params["record"]["scan"]["shape"] == list(ref.shape[1:])
    masks = [np.asarray(m.dataobj) for _, m in results]
    assert all(np.array_equal(masks[0], m) for m in masks[1:])
    assert len({p["covid_probability"] for p, _ in results}) == 1
    # one pipeline run; the other two requests waited for it and were answered from the result cache
    assert sorted(p["cached"] for p, _ in results) == [False, True, True]


def test_saved_label_trains_the_segmenter_and_infer_uses_it(server, tmp_path):
    import requests

    shipped = server.bundles / "ct_lung_segmentation" / "models" / "model.pt"
    shipped_hash = _sha256(shipped)
    label = data_path("ct", "medseg", "lung_masks", "rp6.nii.gz")  # a radiologist's lung label for rp6
    with open(label, "rb") as f:
        r = requests.put(f"{server.url}/datastore/label", params={"image": "medseg_rp6", "tag": "final"},
                         files={"label": ("medseg_rp6.nii.gz", f)}, data={"params": json.dumps({"model": "lung"})},
                         timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["label"] == "medseg_rp6"
    objects = _get(server, "/datastore/", params={"output": "all"}).json()["objects"]
    assert "final" in objects["medseg_rp6"]["labels"]

    r = _post(server, "/train/lung_segmentation", json={"max_epochs": 1, "max_slices_per_item": 4, "batch_size": 4})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        task = _get(server, "/train/").json()
        if task["status"] in ("DONE", "ERROR"):
            break
        assert time.monotonic() < deadline, f"training still {task['status']} after {TRAIN_TIMEOUT_S} s"
        time.sleep(3)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))

    finetuned = server.app / "model" / "ct_lung_segmentation" / "models" / "model.pt"
    assert finetuned.is_file()
    assert _sha256(shipped) == shipped_hash  # the shipped bundle's weights are never overwritten
    stats = _get(server, "/info/").json()["train_stats"]["lung_segmentation"]
    assert stats["epochs"] == 1 and stats["labelled_images"] == 1
    assert stats["validation_on_training_images"] is True
    assert 0.0 <= stats["best_metric"] <= 1.0

    r = _infer(server, "lung_segmentation", "totalseg_ct_sm", output="json")
    assert r.status_code == 200
    assert r.json()["cached"] is False  # new weights: the cached result of this study is not reused
    used = r.json()["record"]["models"]["segmentation"]
    assert used["bundle"] == str(finetuned.parents[1])
    assert used["weights_sha256"] == _sha256(finetuned)


def test_saved_lung_and_lesion_label_trains_the_lesion_model(server, tmp_path):
    """A corrected label map (lung 1, lesions 2) fine-tunes the lesion model into the app's model dir."""
    import nibabel as nib
    import requests

    lung = nib.load(data_path("ct", "medseg", "lung_masks", "rp4.nii.gz"))
    lesion = np.asarray(nib.load(data_path("ct", "medseg", "infection_masks", "rp4.nii.gz")).dataobj) > 0
    values = (np.asarray(lung.dataobj) > 0).astype(np.uint8)
    values[lesion] = 2
    label = tmp_path / "medseg_rp4.nii.gz"
    nib.save(nib.Nifti1Image(values, lung.affine), label)
    with open(label, "rb") as f:
        r = requests.put(f"{server.url}/datastore/label", params={"image": "medseg_rp4", "tag": "final"},
                         files={"label": ("medseg_rp4.nii.gz", f)}, timeout=60)
    assert r.status_code == 200, r.text
    shipped = server.bundles / "ct_lung_infection_segmentation" / "models" / "model.pt"
    shipped_hash = _sha256(shipped)
    r = _post(server, "/train/lung_infection_segmentation",
              json={"max_epochs": 1, "max_slices_per_item": 4, "batch_size": 4})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while (task := _get(server, "/train/").json())["status"] not in ("DONE", "ERROR"):
        assert time.monotonic() < deadline, f"training still {task['status']} after {TRAIN_TIMEOUT_S} s"
        time.sleep(3)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    finetuned = server.app / "model" / "ct_lung_infection_segmentation" / "models" / "model.pt"
    assert finetuned.is_file() and _sha256(shipped) == shipped_hash
    stats = _get(server, "/info/").json()["train_stats"]["lung_infection_segmentation"]
    assert stats["epochs"] == 1 and stats["labelled_images"] == 2  # rp6 (lung only) and rp4
    r = _infer(server, "lung_infection_segmentation", "medseg_rp4", output="json")
    assert r.status_code == 200 and r.json()["cached"] is False
    used = r.json()["record"]["models"]["infection"]
    assert used["bundle"] == str(finetuned.parents[1]) and used["weights_sha256"] == _sha256(finetuned)
