"""Loading a stage's network from its MONAI bundle.

Each pipeline stage is one bundle under ``bundles/`` (or ``--bundle-dir``): the network is built from the
``network_def`` of ``configs/inference.json`` with :class:`monai.bundle.ConfigParser` (so the bundle, not
the pipeline, defines the architecture and its arguments), and the trained weights come from
``models/model.pt``. A missing checkpoint is never replaced by random weights: it raises
:class:`MissingWeightsError`, naming the bundle and how to train it, unless the caller asked to skip
stages without weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ctcovid.io.hashing import sha256_file

from .errors import BundleError, MissingWeightsError
from .utils import bundles_root, load_bundle_metadata

WEIGHTS_FILE = Path("models") / "model.pt"


def _missing_weights(stage: str, bundle: str, bundle_dir: Path) -> MissingWeightsError:
    """The error for a stage whose bundle has no ``models/model.pt``, saying how to train it."""
    return MissingWeightsError(
        f"{stage}: no trained weights in {bundle_dir / WEIGHTS_FILE} (bundle {bundle}). "
        f"Train it with `python -m monai.bundle run --config_file {bundle_dir / 'configs' / 'train.json'}` "
        f"(see {bundle_dir / 'docs' / 'README.md'}) and put the checkpoint at {WEIGHTS_FILE}, "
        "or leave out --require-all (skip_missing=True) to run the other stages without it.",
        bundle=bundle,
        stage=stage,
        bundle_dir=bundle_dir,
    )


@dataclass
class StageModel:
    """One stage's network with the provenance that goes into every result.

    ``network`` is ``None`` when the stage is skipped (``skipped`` then says why, in plain words).
    """

    stage: str
    bundle: str
    bundle_dir: Path
    version: str | None = None
    weights_sha256: str | None = None
    network: nn.Module | None = None
    metadata: dict = field(default_factory=dict, repr=False)
    config: Any = field(default=None, repr=False)  # monai.bundle.ConfigParser
    skipped: str | None = None

    @property
    def available(self) -> bool:
        return self.network is not None

    def provenance(self) -> dict:
        """JSON-ready ``{bundle, version, weights_sha256, status}`` for result records and resume keys."""
        return {
            "bundle": self.bundle,
            "version": self.version,
            "weights_sha256": self.weights_sha256,
            "status": "loaded" if self.available else f"skipped: {self.skipped}",
        }

    def channel_names(self) -> list[str]:
        """Class names of the output channels from ``network_data_format.outputs.pred.channel_def``."""
        cdef = _get(self.metadata, "network_data_format", "outputs", "pred", "channel_def") or {}
        if not all(str(k).isdigit() for k in cdef):  # ranges like "0-63" describe inputs, not classes
            return []
        return [str(cdef[k]) for k in sorted(cdef, key=lambda k: int(k))]

    def input_shape(self) -> list[int] | None:
        """``network_data_format.inputs.image.spatial_shape`` (the size the network was trained at)."""
        shape = _get(self.metadata, "network_data_format", "inputs", "image", "spatial_shape")
        return [int(s) for s in shape] if shape else None

    def class_names(self, default: Sequence[str]) -> list[str]:
        """Output class names: the config's ``class_names``, else metadata ``channel_def``, else ``default``."""
        names = self.config_value("class_names") or self.channel_names() or default
        return [str(n) for n in names]

    def in_plane_size(self, default: tuple[int, int]) -> tuple[int, int]:
        """``(H, W)`` the network takes: config ``spatial_size``, else metadata ``spatial_shape``, else ``default``."""
        shape = self.config_value("spatial_size") or self.input_shape() or default
        return int(shape[-2]), int(shape[-1])

    def config_value(self, *keys: str, default: Any = None) -> Any:
        """The parsed value of the first of ``keys`` present in ``inference.json`` (else ``default``)."""
        if self.config is None:
            return default
        for key in keys:
            if key in self.config:
                return self.config.get_parsed_content(key)
        return default

    def transform_args(self, target_suffix: str, names: tuple[str, ...]) -> dict[str, Any] | None:
        """Arguments of the first ``preprocessing`` transform whose ``_target_`` ends with ``target_suffix``.

        Lets the pipeline apply a stage's own preprocessing settings (e.g. the lung window of
        ``NormalizeCTIntensityd``) without re-running its file-based transform chain. Only ``names`` are
        returned, parsed (``@`` references resolved); ``None`` if the bundle has no such transform.
        """
        if self.config is None or "preprocessing" not in self.config:
            return None
        transforms = (
            self.config["preprocessing"].get("transforms", [])
            if isinstance(self.config["preprocessing"], Mapping)
            else []
        )
        for i, item in enumerate(transforms):
            if isinstance(item, Mapping) and str(item.get("_target_", "")).endswith(target_suffix):
                return {
                    k: self.config.get_parsed_content(f"preprocessing#transforms#{i}#{k}")
                    for k in names
                    if k in item
                }
        return None


def _get(d: Mapping, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def weights_hash(path: Path) -> str:
    """SHA-256 of a weight file, cached on (path, size, mtime) so repeated loads do not re-read it."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_file(path)
    return _HASH_CACHE[key]


def read_state_dict(path: str | os.PathLike) -> dict:
    """The float32 state dict stored in a weight file (see :func:`_state_dict` for the accepted layouts)."""
    return _state_dict(torch.load(path, map_location="cpu", weights_only=True), Path(path))


def _state_dict(obj: Any, path: Path) -> dict:
    # models/model.pt is a plain state dict; also accept {"model": sd} / {"state_dict": sd} checkpoints
    if isinstance(obj, Mapping) and len(obj) == 1:
        (only,) = obj.values()
        if isinstance(only, Mapping) and any(isinstance(v, torch.Tensor) for v in only.values()):
            obj = only
    if not isinstance(obj, Mapping):
        raise BundleError(f"{path}: not a state dict (got {type(obj).__name__})")
    # strip DistributedDataParallel's "module." prefix; weights stored in half precision to stay under the
    # repository's file size limit (ctcovid.training.export_weights) run in float32
    return {(k[7:] if k.startswith("module.") else k): _as_float32(v) for k, v in obj.items()}


def _as_float32(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


class _ConfigError(Exception):
    """``network_def`` could not be instantiated (the cause is chained)."""


def _instantiate(config) -> nn.Module:
    try:
        return config.get_parsed_content("network_def", instantiate=True, lazy=False)
    except Exception as e:  # config errors surface as many types
        raise _ConfigError(str(e)) from e


def _build_and_load(config, weights: Path) -> nn.Module:
    """``network_def`` with the checkpoint's tensors, holding the weights in memory once.

    The network is built on the ``meta`` device (no random initialisation: the six Inception members
    alone take seconds to initialise and as much memory as the weights) and the loaded checkpoint's
    tensors become its parameters (``assign=True``, no copy). Not memory-mapped: channels-last
    conversion copies the 4D weights, and the mapping would stay resident for the 1D ones. A network that cannot be built on ``meta`` or keeps tensors the checkpoint does not
    hold (non-persistent buffers) is built normally and the checkpoint copied in.
    """
    state = _state_dict(torch.load(weights, map_location="cpu", weights_only=True), weights)
    try:
        with torch.device("meta"):
            network = _instantiate(config)
    except _ConfigError:
        network = None
    if network is not None:
        network.load_state_dict(state, strict=True, assign=True)
        if not any(t.is_meta for t in (*network.parameters(), *network.buffers())):
            return network
    network = _instantiate(config)
    network.load_state_dict(state, strict=True)
    return network


def read_bundle_config(bundle_dir: Path):
    """``ConfigParser`` over ``configs/inference.json`` with ``bundle_root`` pointing at ``bundle_dir``."""
    from monai.bundle import ConfigParser

    config_file = bundle_dir / "configs" / "inference.json"
    if not config_file.is_file():
        raise BundleError(f"{bundle_dir}: not a bundle (no configs/inference.json)")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(bundle_dir)  # --bundle-dir must win over the config's own default
    return parser


def load_stage(
    stage: str,
    bundle: str,
    bundle_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    skip_missing: bool = False,
) -> StageModel:
    """Build ``bundle``'s ``network_def`` and load ``models/model.pt`` onto ``device`` in eval mode.

    Args:
        stage: human name of the stage for messages (``"detection"``, ...).
        bundle: bundle folder name (``"ct_covid_classification"``).
        bundle_dir: folder holding the bundles; default :func:`ctcovid.bundle.bundles_root`.
        device: where the network goes.
        skip_missing: return a skipped :class:`StageModel` instead of raising when weights are absent.

    Raises:
        MissingWeightsError: no ``models/model.pt`` and ``skip_missing`` is false.
        BundleError: the bundle folder or config is missing, or the checkpoint does not fit the network.
    """
    root = Path(bundle_dir).expanduser().resolve() if bundle_dir is not None else bundles_root()
    bdir = root / bundle
    if not (bdir / "configs").is_dir():
        if skip_missing:
            return StageModel(stage, bundle, bdir, skipped=f"bundle {bundle} not found in {root}")
        raise BundleError(f"{stage}: bundle {bundle} not found in {root} (no {bdir / 'configs'})")
    try:
        metadata = load_bundle_metadata(bdir)
    except (OSError, ValueError) as e:
        if skip_missing:
            return StageModel(
                stage, bundle, bdir, skipped=f"bundle {bundle} has no readable configs/metadata.json"
            )
        raise BundleError(f"{stage}: bundle {bundle} ({bdir}): cannot read configs/metadata.json: {e}") from e
    version = metadata.get("version")
    weights = bdir / WEIGHTS_FILE
    if not weights.is_file():
        if not skip_missing:
            raise _missing_weights(stage, bundle, bdir)
        return StageModel(
            stage,
            bundle,
            bdir,
            version=version,
            metadata=metadata,
            skipped=f"no trained weights shipped in {bdir / 'models'}; train with "
            f"`python -m monai.bundle run --config_file {bdir / 'configs' / 'train.json'}`",
        )
    config = read_bundle_config(bdir)
    try:
        network = _build_and_load(config, weights)
    except BundleError:
        raise
    except _ConfigError as e:
        raise BundleError(
            f"{stage}: cannot build network_def of bundle {bundle} ({bdir}): {e.__cause__}"
        ) from e
    except Exception as e:
        raise BundleError(f"{stage}: {weights} does not fit the network of bundle {bundle}: {e}") from e
    network.to(device).eval()
    return StageModel(
        stage,
        bundle,
        bdir,
        version=version,
        weights_sha256=weights_hash(weights),
        network=network,
        metadata=metadata,
        config=config,
    )


def bundle_weights_status(
    bundle: str, bundle_dir: str | os.PathLike | None = None, with_hash: bool = True
) -> dict:
    """``{bundle, path, version, weights, weights_sha256, weights_mb}`` for ``ctcovid info`` (no network built)."""
    root = Path(bundle_dir).expanduser().resolve() if bundle_dir is not None else bundles_root()
    bdir = root / bundle
    info: dict[str, Any] = {"bundle": bundle, "path": str(bdir), "version": None, "weights": False}
    if not (bdir / "configs" / "metadata.json").is_file():
        info["error"] = "bundle not found"
        return info
    try:
        info["version"] = load_bundle_metadata(bdir).get("version")
    except (OSError, ValueError) as e:
        info["error"] = f"unreadable metadata.json: {e}"
    weights = bdir / WEIGHTS_FILE
    if weights.is_file():
        info["weights"] = True
        info["weights_mb"] = round(weights.stat().st_size / 2**20, 1)
        if with_hash:
            info["weights_sha256"] = weights_hash(weights)
    return info


__all__ = [
    "BundleError",
    "MissingWeightsError",
    "StageModel",
    "bundle_weights_status",
    "load_stage",
    "read_bundle_config",
    "weights_hash",
]
