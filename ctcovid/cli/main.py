"""``ctcovid`` command line: a thin dispatcher over sub-command modules.

Each sub-command lives in its own module of :mod:`ctcovid.cli` exposing ``add_parser(subparsers)``
(registers the sub-command, sets ``func``) so that parsing stays thin and the work happens in
:mod:`ctcovid.ct`, :mod:`ctcovid.cxr` and :mod:`ctcovid.running`. Modules are imported lazily: ``ctcovid --help`` must not pay for torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Sub-command modules, in the order ``--help`` lists them.
SUBCOMMAND_MODULES = ("demo", "predict", "info", "cxr", "quality", "label_app")


def build_parser() -> argparse.ArgumentParser:
    from ctcovid import __version__

    parser = argparse.ArgumentParser(
        prog="ctcovid",
        description="COVID-19 detection and severity grading for chest CT and chest X-ray (MONAI).",
    )
    parser.add_argument("--version", action="version", version=f"ctcovid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"ctcovid.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"ctcovid.cli.{name}":  # sub-command not built yet
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
