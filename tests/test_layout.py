"""The package's shape: layers point down, modules stay small, old import paths still work (with a warning),
and the CT pipeline is the list of stages the docs describe."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

import ctcovid

PACKAGE = Path(ctcovid.__file__).parent

#: Layer of each top-level package or module; an import may only point to the same layer or a lower one.
LAYERS = {
    "io": 0,
    "profiling": 0,
    "transforms": 1,
    "networks": 1,
    "losses": 1,
    "metrics": 1,
    "visualize": 1,
    "bundle": 2,
    "training": 3,
    "running": 3,
    "ct": 4,
    "cxr": 4,
    "cli": 5,
    "label": 5,
}
#: Deprecated aliases (they import lazily from their new homes, so they sit outside the layers).
ALIASES = ("pipelines", "handlers", "data")
MAX_MODULE_LINES = 420  # "no module over ~400 lines"


def _ctcovid_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, "ctcovid.x.y")`` of every absolute ctcovid import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(n, m) for n, m in out if m.split(".")[0] == "ctcovid"]


def test_every_top_level_package_has_a_layer():
    modules = [p for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()]
    tops = {p.name.removesuffix(".py") for p in modules if not p.name.startswith(("_", "."))}
    assert tops - set(LAYERS) - set(ALIASES) == set(), "add the new package to LAYERS (and docs/DEVELOPING.md)"


def test_layers_only_import_downwards():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if top not in LAYERS:
            continue
        for line, module in _ctcovid_imports(path):
            target = module.split(".")[1] if "." in module else None
            if target in ALIASES:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports the deprecated {module}")
            elif target in LAYERS and LAYERS[target] > LAYERS[top]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} ({top}) imports {module} (a higher layer)")
    assert upward == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ctcovid.ct.pipeline import CTCovidPipeline\n")
    assert _ctcovid_imports(probe) == [(2, "ctcovid.ct.pipeline")]


def test_no_module_is_long():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


@pytest.mark.parametrize(
    ("old", "name", "new"),
    [
        ("ctcovid.pipelines", "CTCovidPipeline", "ctcovid.ct"),
        ("ctcovid.pipelines", "run_batch", "ctcovid.running"),
        ("ctcovid.pipelines", "MissingWeightsError", "ctcovid.bundle"),
        ("ctcovid.pipelines", "CXRCascade", "ctcovid.cxr"),
        ("ctcovid.handlers", "ClassificationReportWriter", "ctcovid.training.handlers"),
        ("ctcovid.data", "ScanDataset", "ctcovid.training"),
        ("ctcovid.data", "ApplyIfKeyPresentd", "ctcovid.transforms"),
    ],
)
def test_deprecated_aliases_warn_and_give_the_same_object(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new}\.{name}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
            module.NotAThing  # noqa: B018


def test_ct_stage_list_matches_the_documented_order():
    from ctcovid.bundle import bundles_root
    from ctcovid.ct import DEFAULT_BUNDLES, STAGE_TYPES, STAGES

    assert [t.name for t in STAGE_TYPES] == [
        "slice_filter",
        "segmentation",
        "slice_selection",
        "infection",
        "detection",
        "severity",
    ]
    assert STAGES == (
        "read",
        "slice_filter",
        "segmentation",
        "mask_cleanup",
        "infection",
        "involvement",
        "volume_building",
        "detection",
        "gradcam",
        "severity",
    )
    assert DEFAULT_BUNDLES == {
        "slice_filter": "ct_lung_slice_filter",
        "segmentation": "ct_lung_segmentation",
        "infection": "ct_lung_infection_segmentation",
        "detection": "ct_covid_classification",
        "severity": "ct_covid_severity_classification",
    }
    for bundle in DEFAULT_BUNDLES.values():
        assert (bundles_root() / bundle / "configs" / "inference.json").is_file()
    # every stage module is one file under ctcovid/ct/stages
    for t in STAGE_TYPES:
        assert t.__module__.startswith("ctcovid.ct.stages."), t
