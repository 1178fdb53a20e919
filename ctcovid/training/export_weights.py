"""Ship a trained checkpoint as a bundle's ``models/model.pt`` (or another ``--model-file``): a plain state dict, optionally in half precision.

A bundle file must stay under the repository's 60 MB limit; SEME-ResNet50 is ~100 MB in float32 and ~50 MB in
float16. ``ctcovid.bundle.loading`` turns half-precision tensors back into float32 when it loads them, so the
networks run exactly as before apart from the rounding, which :func:`export_weights` measures on the
bundle's own network (largest output difference on random inputs) so the bundle docs can say it.

    python -m ctcovid.training.export_weights ~/.cache/ctcovid-train/<bundle>/model.pt bundles/<bundle> --dtype fp16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ctcovid.io.atomic import atomic_write

__all__ = ["export_weights"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _plain_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    from ctcovid.bundle.loading import _state_dict

    return _state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True), checkpoint)


def export_weights(
    checkpoint: str | Path,
    bundle_dir: str | Path,
    dtype: str = "fp16",
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    model_file: str = "model.pt",
    overrides: dict | None = None,
) -> dict:
    """Write ``checkpoint``'s state dict to ``<bundle_dir>/models/<model_file>`` with floating tensors in ``dtype``.

    Args:
        checkpoint: a ``CheckpointSaver`` file (``{"model": sd}``) or a plain state dict.
        bundle_dir: the bundle; its ``configs/inference.json`` ``network_def`` is used for the check.
        dtype: ``fp32``, ``fp16`` or ``bf16`` storage.
        input_shape: ``(N, C, H, W)`` of the check's random input; None skips the check.
        model_file: file name under ``models/`` (e.g. ``model_cbam.pt`` for a bundle's second variant).
        overrides: inference-config values for building the checked network (e.g. ``{"use_cbam": True}``).

    Returns:
        ``{"file", "bytes", "dtype", "max_abs_output_diff"}`` (the difference between the network's outputs with
        the float32 and the stored weights, both run in float32).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    state = _plain_state(Path(checkpoint))
    stored = {k: v.to(_DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    target = Path(bundle_dir) / "models" / model_file
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: torch.save(stored, tmp))
    report = {"file": str(target), "bytes": target.stat().st_size, "dtype": dtype, "max_abs_output_diff": None}
    if input_shape is not None:
        report["max_abs_output_diff"] = _output_difference(
            Path(bundle_dir), state, target, input_shape, seed, overrides or {}
        )
    return report


def _output_difference(
    bundle_dir: Path, state: dict, stored_file: Path, input_shape, seed: int, overrides: dict
) -> float:
    from ctcovid.bundle.loading import read_bundle_config

    def build(sd):
        config = read_bundle_config(bundle_dir)
        config.update(overrides)
        net = config.get_parsed_content("network_def", instantiate=True)
        net.load_state_dict(sd, strict=True)
        return net.eval()

    x = torch.rand(*input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = build(state)(x)
        out = build(_plain_state(stored_file))(x)
    return float((ref - out).abs().max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctcovid.training.export_weights", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="best checkpoint written by training (e.g. ~/.cache/ctcovid-train/<b>/model.pt)")
    p.add_argument("bundle_dir", help="bundle folder; writes <bundle_dir>/models/model.pt")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp16")
    p.add_argument("--input-shape", type=int, nargs="+", default=None, help="N C H W of the output check")
    p.add_argument("--model-file", default="model.pt", help="file name under <bundle_dir>/models/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="inference-config override for the output check, e.g. use_cbam=true (repeatable)")
    args = p.parse_args(argv)
    shape = tuple(args.input_shape) if args.input_shape else None
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set expects KEY=JSON, got {item!r}")
        overrides[key] = json.loads(value)
    report = export_weights(args.checkpoint, args.bundle_dir, args.dtype, shape, model_file=args.model_file,
                            overrides=overrides)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
