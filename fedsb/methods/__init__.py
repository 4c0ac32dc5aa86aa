"""The federated methods, one module each, behind `fedsb.methods.base.FederatedMethod`."""

from torch import nn

from fedsb.core.adapters import target_specs
from fedsb.methods.base import FederatedMethod, InvalidUpdate, normalize_weights
from fedsb.methods.fedex import FedExLoRA
from fedsb.methods.fedit import FedIT
from fedsb.methods.fedsb import FedSB
from fedsb.methods.ffa import FFALoRA

METHODS: dict[str, type[FederatedMethod]] = {m.name: m for m in (FedIT, FFALoRA, FedExLoRA, FedSB)}


def get_method(name: str) -> type[FederatedMethod]:
    """The method class registered under `name`."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "FederatedMethod", "InvalidUpdate", "build_method", "get_method", "normalize_weights",
           "FedIT", "FFALoRA", "FedExLoRA", "FedSB"]


def build_method(name: str, model: nn.Module, targets: list[str], rank: int, alpha: float,
                 **options) -> FederatedMethod:
    """Create method `name` for the model's target modules and inject its adapters into the model."""
    method = get_method(name)(target_specs(model, targets), rank, alpha, **options)
    method.inject(model)
    return method
