"""``ctcovid info``: versions, device, and which bundles have trained weights."""

from __future__ import annotations

import argparse
import json
import platform


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "info",
        help="print versions, the compute device and which bundles have trained weights",
        description="Versions of ctcovid and its main dependencies, CUDA availability, and per bundle: version, "
        "whether models/model.pt is present and its SHA-256.",
    )
    p.add_argument(
        "--bundle-dir", default=None, help="folder holding the bundles (default: the package's bundles/)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)
    return p


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def collect_info(bundle_dir: str | None = None) -> dict:
    """Everything ``ctcovid info`` prints, as a dict."""
    import torch

    from ctcovid import __version__
    from ctcovid.bundle import BUNDLE_NAMES, bundles_root
    from ctcovid.bundle.loading import bundle_weights_status

    versions = {"ctcovid": __version__, "python": platform.python_version()}
    for dist in (
        "torch",
        "torchvision",
        "monai",
        "timm",
        "pydicom",
        "nibabel",
        "SimpleITK",
        "pytorch-ignite",
    ):
        versions[dist] = _version(dist)
    cuda = torch.cuda.is_available()
    device = {
        "cuda_available": cuda,
        "torch_cuda_build": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "auto_device": "cuda" if cuda else "cpu",
        "cpu_threads": torch.get_num_threads(),
    }
    root = bundle_dir or str(bundles_root())
    bundles = [bundle_weights_status(name, root) for name in BUNDLE_NAMES]
    return {"versions": versions, "device": device, "bundle_dir": root, "bundles": bundles}


def run(args) -> int:
    info = collect_info(args.bundle_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("versions:")
    for name, v in info["versions"].items():
        print(f"  {name:<15} {v or 'not installed'}")
    dev = info["device"]
    gpus = ", ".join(dev["cuda_devices"]) or "none"
    print("device:")
    print(
        f"  cuda available  {dev['cuda_available']} (torch CUDA build {dev['torch_cuda_build']}; GPUs: {gpus})"
    )
    print(f"  --device auto   {dev['auto_device']} ({dev['cpu_threads']} CPU threads)")
    print(f"bundles in {info['bundle_dir']}:")
    for b in info["bundles"]:
        if "error" in b and not b["weights"]:
            state = b["error"]
        elif b["weights"]:
            state = f"weights {b['weights_mb']} MB, sha256 {b['weights_sha256']}"
        else:
            state = "no trained weights (models/model.pt missing)"
        print(f"  {b['bundle']:<36} v{b['version'] or '?':<8} {state}")
    return 0
