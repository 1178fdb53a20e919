"""The committed datalists of the two CT lung bundles are what ``python -m ctcovid.training.lung_datalist`` makes
from ``../shared/data`` today: every file they name exists (a stale list made training crash on 77 missing Ma et
al. slices), no slice of a test volume (MedSeg rp6 / rp8 or their Ma et al. copies) trains or validates, and
validation takes whole estimated patients."""

from __future__ import annotations

import json

from ctcovid.bundle import bundles_root
from ctcovid.training.lung_datalist import DEFAULT_VAL_GROUPS, TEST_CASES, build_lung_datalists

BUNDLES = ("ct_lung_segmentation", "ct_lung_slice_filter")


def test_committed_lung_datalists_are_rebuilt_exactly_from_the_shared_data(shared_data):
    built = dict(zip(BUNDLES, build_lung_datalists(shared_data)))
    for name in BUNDLES:
        committed = json.loads((bundles_root() / name / "configs" / "datalist.json").read_text())
        assert built[name] == committed, (
            f"{name}: committed datalist is stale; rerun python -m ctcovid.training.lung_datalist"
        )
        listed = [it for part in ("training", "validation", "test") for it in committed[part]]
        missing = [it["image"] for it in listed if not (shared_data / it["image"]).exists()]
        missing += [
            it["label"] for it in listed if "label" in it and not (shared_data / it["label"]).exists()
        ]
        assert not missing, f"{name}: {len(missing)} listed files missing, e.g. {missing[:3]}"
    seg = built["ct_lung_segmentation"]
    used = seg["training"] + seg["validation"]
    assert not any(case in it["case"] for it in used for case in TEST_CASES)
    assert {e["group"].split("+")[0] for e in seg["excluded"]} <= set(TEST_CASES)
    assert {it["case"] for it in seg["validation"]} == {f"ma2020/{g}" for g in DEFAULT_VAL_GROUPS}
    assert {it["case"] for it in seg["training"]}.isdisjoint(it["case"] for it in seg["validation"])


def test_load_lung_datalist_repeats_items_of_the_named_sources_after_the_limit(tmp_path):
    from ctcovid.training import load_lung_datalist

    items = [{"image": f"ma/{i}.png", "source": "ma2020"} for i in range(3)]
    items += [{"image": "medseg/rp2.nii.gz", "source": "medseg"}, {"image": "ts/ct.nii.gz", "source": "ts"}]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": items}))

    plain = load_lung_datalist(path, "training", tmp_path)
    assert [it["image"] for it in plain] == [str(tmp_path / it["image"]) for it in items]
    out = load_lung_datalist(path, "training", tmp_path, limit=2, repeats={"medseg": 3, "ts": 2, "other": 5})
    names = [it["image"].removeprefix(str(tmp_path) + "/") for it in out]
    assert names == ["ma/0.png", "ma/1.png"] + ["medseg/rp2.nii.gz"] * 3 + ["ts/ct.nii.gz"] * 2
    assert out[2] is not out[3]  # independent copies: a later edit of one sample does not change another
