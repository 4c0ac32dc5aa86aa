"""The federated methods, one module each, behind `fedsb.methods.base.FederatedMethod`, and their registry.

A method declares what differs (what a client trains, uploads and receives once, its adapter kind,
whether it keeps a residual, whether its init needs gradients, its labels); the worker, server,
privacy and config code ask it and never test its name.

The registry is importable without torch (the config validates `method.name` against it, and the
analysis layer never loads torch): the built-in methods are imported when first asked for.
`register` adds another method class, e.g. from a plugin or a test.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from fedsb.methods.base import FederatedMethod

# name -> "module:class" (imported on first use) or the class itself
_REGISTRY: dict[str, Any] = {
    "fedit": "fedsb.methods.fedit:FedIT",
    "ffa": "fedsb.methods.ffa:FFALoRA",
    "fedex": "fedsb.methods.fedex:FedExLoRA",
    "fedsb": "fedsb.methods.fedsb:FedSB",
    "bone": "fedsb.methods.bone:Bone",
    "mora": "fedsb.methods.mora:MoRA",
}


def method_names() -> list[str]:
    """Every registered method's name (the accepted values of the config's method.name)."""
    return list(_REGISTRY)


def register(cls: type[FederatedMethod]) -> type[FederatedMethod]:
    """Register a method class under its `name` (usable as a class decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_method(name: str) -> type[FederatedMethod]:
    """The method class registered under `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(_REGISTRY)}")
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = _REGISTRY[name] = getattr(importlib.import_module(module), attr)
    return entry


def build_method(name: str, model: nn.Module, targets: list[str], rank: int, alpha: float,
                 **options: Any) -> FederatedMethod:
    """Create method `name` for the model's target modules and inject its adapters into the model."""
    from fedsb.core.adapters import target_specs

    method = get_method(name)(target_specs(model, targets), rank, alpha, **options)
    method.inject(model)
    return method


_BASE_NAMES = ("FederatedMethod", "InvalidUpdate", "normalize_weights")


def __getattr__(name: str) -> Any:
    """`METHODS` (name -> class, every registered method) and the base names, loaded on first use."""
    if name == "METHODS":
        return {n: get_method(n) for n in _REGISTRY}
    if name in _BASE_NAMES:
        return getattr(importlib.import_module("fedsb.methods.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "FederatedMethod", "InvalidUpdate", "build_method", "get_method", "method_names",
           "normalize_weights", "register", "unregister"]
