"""Adapter layers, their injection into a model, and adapter state as plain tensors.

An adapter wraps one frozen linear layer (nn.Linear, or transformers' Conv1D which stores
its weight as (in, out)) with weight W0 (out x in, m x n):

    LoRA     y = W0 x + s * B (A x)          [+ residual x, FedEx-LoRA]  [- s * B0 (A0 x)]
    LoRA-SB  y = W0 x + s * B (R (A x))
    Bone, MoRA: subclasses of AdapterLayer with one trained tensor each (fedsb.core.block_adapters),
    found through `adapter_layer_class(kind)`.

The last term is the base offset of an init that takes its initial product out of the frozen
weight (PiSSA, OLoRA, LoRA-GA: W_res = W0 - s B0 A0, so the model is unchanged at step 0). It is
kept here, as two frozen float32 factors beside the adapter, rather than subtracted from the stored
W0: the one base model of a process stays the pretrained one for everything that reads it (the
init gradient at W0, another run, the export, which PEFT loads onto the original weights), and
a bfloat16 base does not round W_res. At step 0 (B = B0, A = A0) the two products are the same
operations on the same tensors, so s (B A x - B0 A0 x) is exactly zero.

A, R and B are bias-free nn.Linear layers (A: n -> r, R: r -> r, B: r -> m), so Opacus
computes their per-sample gradients with its built-in Linear rule.

Adapter *state* is a flat dict of tensors. Keys are "<module>.<component>" for adapter
tensors (component in COMPONENTS; lora_* hold nn.Linear weights, i.e. A is r x n, B is m x r,
R is r x r; the offset's lora_A0 and lora_B0 are shaped as A and B) and the parameter name for
task-head tensors (component "head"). The FedEx-LoRA residual is kept in the base weight's own
layout: out x in, or in x out for Conv1D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.core.models import find_head_modules, weight_shape

State = dict[str, torch.Tensor]

COMPONENTS = ("lora_A", "lora_B", "lora_R", "residual", "lora_A0", "lora_B0",
              # the block adapters' trained tensors (fedsb.core.block_adapters): Bone's b x b blocks, MoRA's M
              "bone_block", "mora_M")
# The base offset's factors, and the adapter component each one starts equal to (B0 = B at step 0).
OFFSET_COMPONENTS = ("lora_A0", "lora_B0")
INITIAL_VALUE_OF = {"lora_A0": "lora_A", "lora_B0": "lora_B"}
BUFFERS = ("residual", *OFFSET_COMPONENTS)  # frozen tensors of a layer (the others are nn.Linear weights)
HEAD = "head"
ADAPTER_KINDS = ("lora", "lora_sb")
ADAPTER_DTYPE = torch.float32  # adapters, residuals and everything sent on the wire


@dataclass(frozen=True)
class ModuleSpec:
    """What a method needs to know about one target module, without the model."""

    name: str
    out_features: int  # m
    in_features: int  # n
    conv1d: bool  # weight stored as (in, out)

    @property
    def weight_layout(self) -> tuple[int, int]:
        """Shape of the base weight (and FedEx residual) as stored."""
        if self.conv1d:
            return self.in_features, self.out_features
        return self.out_features, self.in_features


def component_of(key: str) -> str:
    """The component of a state key: one of COMPONENTS, or 'head'."""
    last = key.rsplit(".", 1)[-1]
    return last if last in COMPONENTS else HEAD


def module_of(key: str) -> str:
    """The target module of an adapter key ('' for head keys)."""
    return key.rsplit(".", 1)[0] if component_of(key) != HEAD else ""


def key(module: str, component: str) -> str:
    return f"{module}.{component}"


class AdapterLayer(nn.Module):
    """A frozen linear layer plus a LoRA or LoRA-SB adapter (optionally a dense residual, and the
    base offset s B0 A0 of an init that takes its product out of the frozen weight)."""

    # The components a layer of this class holds and their shapes, where the class declares them
    # (the block adapters do); None for LoRA and LoRA-SB, whose components also depend on the method's
    # residual and init (FederatedMethod.held, FederatedMethod.component_shapes).
    components: tuple[str, ...] | None = None

    def __init__(self, base: nn.Module, rank: int, scale: float, kind: str, residual: bool = False,
                 offset: bool = False):
        super().__init__()
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"unknown adapter kind {kind!r}; accepted: {', '.join(ADAPTER_KINDS)}")
        if rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        out_features, in_features = weight_shape(base)
        # Adapters (and the residual) are float32 whatever the base's precision: they are trained,
        # averaged and sent on the wire, and exact aggregation holds in float32.
        dtype, device = ADAPTER_DTYPE, base.weight.device
        self.base = base
        self.kind = kind
        self.scale = float(scale)
        self.conv1d = isinstance(base, Conv1D)
        factory = {"bias": False, "dtype": dtype, "device": device}
        self.lora_A = nn.Linear(in_features, rank, **factory)
        self.lora_R = nn.Linear(rank, rank, **factory) if kind == "lora_sb" else None
        self.lora_B = nn.Linear(rank, out_features, **factory)
        for layer in (self.lora_A, self.lora_R, self.lora_B):
            if layer is not None:
                nn.init.zeros_(layer.weight)  # real values come from a state (see fedsb.core.init)
        if residual:
            self.register_buffer("residual", torch.zeros(base.weight.shape, dtype=dtype, device=device))
        else:
            self.residual = None
        if offset:
            self.register_buffer("lora_A0", torch.zeros(rank, in_features, dtype=dtype, device=device))
            self.register_buffer("lora_B0", torch.zeros(out_features, rank, dtype=dtype, device=device))
        else:
            self.lora_A0 = self.lora_B0 = None
        # A client of a lower rank (fedsb.methods.ranks), or a nested-rank training step, uses only the
        # first `active_rank` components: the rest is masked to zero after A, so it gets no gradient
        # (per-sample ones included: Opacus sees the masked activations). None: every component.
        self.active_rank: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        x32 = x.to(ADAPTER_DTYPE)  # a no-op over a float32 base
        low_rank = self.lora_A(x32)
        if self.active_rank is not None and self.active_rank < low_rank.shape[-1]:
            mask = torch.arange(low_rank.shape[-1], device=low_rank.device) < self.active_rank
            low_rank = low_rank * mask.to(low_rank.dtype)
        if self.lora_R is not None:
            low_rank = self.lora_R(low_rank)
        adapter = self.lora_B(low_rank)
        if self.lora_A0 is not None:  # the same operations as lora_B(lora_A(x)): zero at step 0
            adapter = adapter - F.linear(F.linear(x32, self.lora_A0), self.lora_B0)
        out = out + (self.scale * adapter).to(out.dtype)
        if self.residual is not None:
            out = out + (x32 @ self.residual if self.conv1d else F.linear(x32, self.residual)).to(out.dtype)
        return out

    def delta_weight(self) -> torch.Tensor:
        """The adapter's contribution to the effective weight, out x in."""
        return delta_weight({c: self.component(c) for c in self.held()}, self.scale, self.conv1d)

    def held(self) -> tuple[str, ...]:
        """The components this layer holds (its state keys' components)."""
        return tuple(c for c in COMPONENTS if getattr(self, c, None) is not None)

    def component(self, name: str) -> torch.Tensor:
        """One component's tensor: an nn.Linear weight (A, B, R) or a buffer (residual, B0, A0)."""
        part = getattr(self, name)
        return part if name in BUFFERS else part.weight

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight, out x in, in float32."""
        weight = self.base.weight.to(ADAPTER_DTYPE)
        return weight.T if self.conv1d else weight


def delta_weight(components: dict[str, torch.Tensor], scale: float, conv1d: bool) -> torch.Tensor:
    """s * B A (LoRA) or s * B R A (LoRA-SB), minus the base offset s * B0 A0 and plus the residual
    if present; out x in."""
    middle = components["lora_B"]
    if "lora_R" in components:
        middle = middle @ components["lora_R"]
    product = middle @ components["lora_A"]
    if "lora_A0" in components:
        product = product - components["lora_B0"] @ components["lora_A0"]
    delta = scale * product
    residual = components.get("residual")
    if residual is not None:
        delta = delta + (residual.T if conv1d else residual)
    return delta


def inject_adapters(
    model: nn.Module, targets: list[str], rank: int, alpha: float, kind: str, residual: bool = False,
    offset: bool = False,
) -> dict[str, ModuleSpec]:
    """Wrap each target module in an AdapterLayer (in place); returns their specs.

    The scale is alpha / rank, as in LoRA. Adapter tensors start at zero (no effect) until a
    state is loaded.
    """
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, AdapterLayer):
            raise ValueError(f"module {name} already has an adapter")
        setattr(parent, child, adapter_layer_class(kind)(base, rank, alpha / rank, kind, residual, offset))
    return target_specs(model, targets)


def set_active_rank(model: nn.Module, rank: int | None) -> None:
    """Use only the first `rank` components of every adapter (None: all of them)."""
    for layer in adapter_layers(model).values():
        layer.active_rank = rank


def adapter_layer_class(kind: str) -> type[AdapterLayer]:
    """The layer class of an adapter kind: AdapterLayer for LoRA and LoRA-SB, else a block adapter's."""
    if kind in ADAPTER_KINDS:
        return AdapterLayer
    # Imported here: the block adapters build on this module.
    from fedsb.core.block_adapters import BLOCK_LAYERS

    if kind not in BLOCK_LAYERS:
        accepted = ", ".join((*ADAPTER_KINDS, *BLOCK_LAYERS))
        raise ValueError(f"unknown adapter kind {kind!r}; accepted: {accepted}")
    return BLOCK_LAYERS[kind]


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state tensor of the model's adapters and head, by state key (no copies)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model).items():
        for component in layer.held():
            tensors[key(name, component)] = layer.component(component)
    for head in find_head_modules(model):
        for pname, param in model.get_submodule(head).named_parameters():
            tensors[f"{head}.{pname}"] = param
    return tensors


def frozen_base_parameters(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters no method changes: the pretrained model's own, but its task head."""
    changed = {id(t) for t in _tensors(model).values()}
    return {name: p for name, p in model.named_parameters() if id(p) not in changed}


def extract_state(model: nn.Module, components: tuple[str, ...] | None = None) -> State:
    """A detached copy of the adapter (and head) tensors, optionally only some components."""
    return {
        k: t.detach().clone()
        for k, t in _tensors(model).items()
        if components is None or component_of(k) in components
    }


@torch.no_grad()
def load_state(model: nn.Module, state: State) -> None:
    """Copy a (partial) state into the model's adapters and head; unknown keys are an error."""
    tensors = _tensors(model)
    for k, value in state.items():
        if k not in tensors:
            raise KeyError(f"state key {k!r} matches no adapter or head tensor of the model")
        target = tensors[k]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"state key {k!r}: shape {tuple(value.shape)} != {tuple(target.shape)}")
        target.copy_(value)


def set_trainable(model: nn.Module, components: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze the given components; returns the trainable parameters."""
    model.requires_grad_(False)
    trainable = []
    for k, tensor in _tensors(model).items():
        if component_of(k) in components and isinstance(tensor, nn.Parameter):
            tensor.requires_grad_(True)
            trainable.append(tensor)
    return trainable


def base_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The pretrained W0 of each adapted module, out x in, float32 (what OLoRA and PiSSA factor)."""
    layers = adapter_layers(model)
    return {name: layers[name].base_weight().detach() for name in names}


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """W0 + adapter delta for every adapted module, out x in."""
    return {
        name: (layer.base_weight() + layer.delta_weight()).detach()
        for name, layer in adapter_layers(model).items()
    }


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap it (in place); returns the model."""
    for name, layer in adapter_layers(model).items():
        delta = layer.delta_weight().to(layer.base.weight.dtype)
        layer.base.weight += delta.T if layer.conv1d else delta
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    return model


def target_specs(model: nn.Module, targets: list[str] | None = None) -> dict[str, ModuleSpec]:
    """Specs of the given modules (default: the adapted ones), before or after injection."""
    if targets is None:
        targets = list(adapter_layers(model))
    specs = {}
    for name in targets:
        module = model.get_submodule(name)
        base = module.base if isinstance(module, AdapterLayer) else module
        specs[name] = ModuleSpec(name, *weight_shape(base), isinstance(base, Conv1D))
    return specs


def copy_head(peft_params: dict, state: State) -> None:
    """The state's task-head tensors into a PEFT model's `modules_to_save` copies (every PEFT export)."""
    for k, value in state.items():
        if component_of(k) == HEAD:
            head, _, pname = k.rpartition(".")
            peft_params[f"base_model.model.{head}.modules_to_save.default.{pname}"].copy_(value)
