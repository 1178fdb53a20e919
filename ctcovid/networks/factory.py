"""Network registry, after timm's ``create_model``: one name per network variant.

Network modules register their constructors with :func:`register_network`; users and bundle configs
build them with :func:`create_network` (``"_target_": "ctcovid.networks.create_network"``) or by class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_network(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a network constructor (class or function) under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"network name {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_networks() -> list[str]:
    """Names accepted by :func:`create_network`, sorted."""
    return sorted(_REGISTRY)


def create_network(name: str, **kwargs) -> nn.Module:
    """Build the registered network ``name`` with ``kwargs`` (never downloads weights)."""
    try:
        ctor = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; known networks: {', '.join(list_networks())}") from None
    return ctor(**kwargs)
