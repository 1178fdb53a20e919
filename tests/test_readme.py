"""README.md's "Using it" section runs as written: every command of its shell blocks and its Python snippet,
read from the README itself (so the two cannot drift), with the placeholders (``scans/``, ``xrays/*.png``,
``path/to/...``) pointing at real data. Commands whose stages have no shipped weights must exit the way the
README says (``--require-all`` and the X-ray cascade: exit 3, naming what to train)."""

from __future__ import annotations

import glob
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, data_path

from ctcovid.bundle import bundles_root
from ctcovid.cli.main import main
from ctcovid.cli.predict import EXIT_MODELS, EXIT_OK

README = PROJECT_ROOT / "README.md"
CT_BUNDLES = ("ct_lung_slice_filter", "ct_lung_segmentation", "ct_covid_classification", "ct_covid_severity_classification")
CXR_BUNDLES = ("cxr_pneumonia_type_classification", "cxr_covid_viral_classification")


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def _commands(section: str) -> list[list[str]]:
    """Each shell command of the section's bash blocks as argv (comments dropped, continuations joined)."""
    out = []
    for block in _blocks(section, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line))
    return out


def _has_weights(bundles) -> bool:
    return all((bundles_root() / b / "models" / "model.pt").is_file() for b in bundles)


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    """Where the README's placeholders point: a folder of real scans, real radiographs as PNG, outputs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("readme")
    scans = root / "scans"
    scans.mkdir()
    (scans / "chest_two_slices").symlink_to(data_path("fixtures", "lungmask_testdata"))
    xrays = root / "xrays"
    xrays.mkdir()
    kermany = data_path("cxr", "kermany", "train", "NORMAL")
    for src in sorted(kermany.iterdir())[:2]:
        with Image.open(src) as im:
            im.convert("L").save(xrays / f"{src.stem}.png")
    return {"root": root, "scans": scans, "xrays": xrays}


def _argv(command: list[str], places: dict[str, Path]) -> list[str]:
    root = places["root"]
    argv = []
    for token in command:
        if token == "scans/":
            argv.append(str(places["scans"]))
        elif token == "xrays/*.png":
            argv += sorted(glob.glob(str(places["xrays"] / "*.png")))
        elif token.endswith("/") and not token.startswith(("bundles/", "ctcovid/")):  # an output folder
            argv.append(str(root / token))
        else:
            argv.append(token)
    return argv


def test_using_it_commands_run_as_written(places, capsys):
    commands = _commands(_section("Using it"))
    programs = [c[0] for c in commands]
    assert programs.count("ctcovid") >= 5 and "python" in programs  # the section was found and parsed
    for command in commands:
        argv = _argv(command, places)
        if argv[0] == "ctcovid":
            if "--require-all" in argv:
                expected = EXIT_OK if _has_weights(CT_BUNDLES) else EXIT_MODELS
            elif argv[1] == "cxr":
                expected = EXIT_OK if _has_weights(CXR_BUNDLES) else EXIT_MODELS
            else:
                expected = EXIT_OK
            code = main([*argv[1:], *(["--no-progress"] if argv[1] == "predict" else [])])
            captured = capsys.readouterr()
            assert code == expected, f"{' '.join(command)} -> {code}\n{captured.err[-2000:]}"
            if code == EXIT_MODELS:  # the refusal names what to train
                assert "train" in captured.err and "bundle" in captured.err, captured.err
        else:  # python -m monai.bundle ...: as a user runs it, from the repository root
            run = subprocess.run(
                [sys.executable, *argv[1:]], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600
            )
            assert run.returncode == 0, f"{' '.join(command)}\n{run.stderr[-3000:]}"
    # what the main command wrote: per-scan outputs and the summary
    results = places["root"] / "results"
    assert (results / "summary.csv").is_file() and (results / "chest_two_slices_lung_mask.nii.gz").is_file()


def test_using_it_python_snippet_runs_on_real_scans(covid_ct_md_series, totalseg_dir, capsys):
    (snippet,) = _blocks(_section("Using it"), "python")
    assert "path/to/dicom_series" in snippet and "path/to/scan.nii.gz" in snippet
    code = snippet.replace("path/to/dicom_series", str(covid_ct_md_series)).replace(
        "path/to/scan.nii.gz", str(totalseg_dir / "example_ct_sm.nii.gz")
    )
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 -- the README's own code, as a user runs it
    assert tuple(namespace["volume"].shape) == (1, 512, 512, 167)
    assert namespace["result"].status == "ok" and "'status': 'ok'" in capsys.readouterr().out


def test_other_readme_commands_that_ci_can_run(places):
    """verify_metadata (Bundles section): as written, from the repository root."""
    (command,) = [c for c in _commands(_section("Bundles")) if "verify_metadata" in c]
    run = subprocess.run([sys.executable, *command[1:]], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
