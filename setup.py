"""Build hook: ship the bundles (configs, docs, licences, weights) inside the package as ``ctcovid/_bundles``,
so an installed wheel finds them anywhere (``ctcovid.bundle.bundles_root``). Everything else about the
package is in pyproject.toml; an editable install keeps reading ``bundles/`` of the source tree."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

#: Run outputs that bundle configs write next to their configs: never shipped.
RUN_OUTPUTS = shutil.ignore_patterns(
    "eval", "eval_*", "predictions", "gradcam", "logs", "runs", "__pycache__", "*.pyc", ".*"
)


class BuildPyWithBundles(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "ctcovid" / "_bundles"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(Path(__file__).parent / "bundles", target, ignore=RUN_OUTPUTS)


setup(cmdclass={"build_py": BuildPyWithBundles})
