"""The interface every federated method implements (docs/architecture.md section 2).

A method answers four questions on plain dicts of tensors (see `fedsb.core.adapters.State`):
1. adapter: which adapter a client holds (`adapter_kind`, `residual`) and what it trains
   (`trainable`; the task head is always trained);
2. upload: which tensors a client sends after local training (`upload`);
3. aggregate: how the server combines the uploads (`aggregate`);
4. download: which tensors the server sends before local training (`download`), including
   the one-time tensors (`one_time`) a client receives the first time it is sampled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from fedsb.core.adapters import (
    COMPONENTS,
    HEAD,
    ModuleSpec,
    State,
    component_of,
    delta_weight,
    extract_state,
    inject_adapters,
    key,
)
from fedsb.core.init import lora_init


class InvalidUpdate(ValueError):
    """A client upload that does not fit the global state; it is rejected, never aggregated."""


def normalize_weights(weights: Sequence[float]) -> torch.Tensor:
    """Aggregation weights that sum to 1 (e.g. from numbers of examples)."""
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    if len(w) == 0:
        raise ValueError("no client updates to aggregate")
    if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"aggregation weights must be non-negative with a positive sum, got {weights}")
    return w / w.sum()


def weighted_mean(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack([t.double() for t in tensors])
    return torch.tensordot(weights, stacked, dims=1).to(tensors[0].dtype)


class FederatedMethod:
    """Base class: a LoRA adapter, FedAvg of every uploaded tensor, full download each round."""

    name: ClassVar[str]  # the config's method.name
    label: ClassVar[str]  # how figures and tables name it, e.g. "Fed-SB"
    centralised_label: ClassVar[str]  # its centralised reference (one client, pooled data), e.g. "LoRA-SB"
    # Whether initial_adapter_state needs the gradients of the target weights (a gradient-based init);
    # the config's method.init.source says where they come from (server, clients or pooled data).
    init_gradients: ClassVar[bool] = False
    adapter_kind: ClassVar[str] = "lora"
    residual: ClassVar[bool] = False
    trainable: ClassVar[tuple[str, ...]]  # adapter components a client trains
    one_time: ClassVar[tuple[str, ...]] = ()  # components a client downloads once only

    def __init__(self, specs: Mapping[str, ModuleSpec], rank: int, alpha: float):
        if rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        self.specs = dict(specs)
        self.rank = rank
        self.alpha = alpha

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    # 1. Adapter -----------------------------------------------------------------------------
    def inject(self, model: nn.Module) -> None:
        """Wrap the model's target modules (those of `specs`) in this method's adapter layers."""
        inject_adapters(model, list(self.specs), self.rank, self.alpha, self.adapter_kind, self.residual)

    @property
    def trained(self) -> tuple[str, ...]:
        """Every component a client trains: the method's adapter components plus the head."""
        return (*self.trainable, HEAD)

    def initial_adapter_state(self, generator: torch.Generator,
                              gradients: Mapping[str, torch.Tensor] | None = None,
                              lr_eff: float | None = None) -> State:
        """The global adapter tensors before round 1 (LoRA init by default). A gradient-based init
        uses `gradients` and `lr_eff`, the learning rate of its first-update estimate."""
        return lora_init(self.specs, self.rank, generator)

    def initial_state(self, model: nn.Module, generator: torch.Generator,
                      gradients: Mapping[str, torch.Tensor] | None = None, lr_eff: float | None = None
                      ) -> State:
        """The whole global state before round 1: adapter tensors, residuals, and the head."""
        state = self.initial_adapter_state(generator, gradients, lr_eff)
        if self.residual:
            for name, spec in self.specs.items():
                state[key(name, "residual")] = torch.zeros(spec.weight_layout)
        state.update(extract_state(model, (HEAD,)))
        return state

    # 2. Upload ------------------------------------------------------------------------------
    def upload(self, local_state: State) -> State:
        """What a client sends after local training: the tensors it trained."""
        return {k: v for k, v in local_state.items() if component_of(k) in self.trained}

    def validate_upload(self, upload: State, global_state: State) -> None:
        """Raise InvalidUpdate unless the upload has exactly the expected keys, shapes, finite values."""
        expected = self.upload(global_state)
        missing, extra = set(expected) - set(upload), set(upload) - set(expected)
        if missing or extra:
            raise InvalidUpdate(f"upload keys differ: missing {sorted(missing)[:3]}, "
                                f"unexpected {sorted(extra)[:3]}")
        for k, value in upload.items():
            if tuple(value.shape) != tuple(expected[k].shape):
                raise InvalidUpdate(f"{k}: shape {tuple(value.shape)}, expected {tuple(expected[k].shape)}")
            if value.dtype != expected[k].dtype:
                raise InvalidUpdate(f"{k}: dtype {value.dtype}, expected {expected[k].dtype}")
            if not torch.isfinite(value).all():
                raise InvalidUpdate(f"{k}: values are not finite floating-point numbers")

    # 3. Aggregate ---------------------------------------------------------------------------
    def aggregate(self, global_state: State, uploads: Sequence[State], weights: Sequence[float]) -> State:
        """New global state: the weighted mean of every uploaded tensor; the rest unchanged."""
        w = normalize_weights(weights)
        if len(uploads) != len(w):
            raise ValueError(f"{len(uploads)} uploads but {len(w)} weights")
        new_state = dict(global_state)
        for k in self.upload(global_state):
            new_state[k] = weighted_mean([u[k] for u in uploads], w)
        return new_state

    # 4. Download ----------------------------------------------------------------------------
    def download(self, global_state: State, first_time: bool) -> State:
        """What the server sends a client before local training; one-time tensors only once."""
        return {k: v for k, v in global_state.items()
                if first_time or component_of(k) not in self.one_time}

    # Helpers shared by tests, the meter and the export --------------------------------------
    def effective_delta(self, state: State) -> dict[str, torch.Tensor]:
        """Per module, the adapter's contribution to the effective weight (out x in)."""
        return {
            name: delta_weight({c: state[key(name, c)] for c in COMPONENTS if key(name, c) in state},
                               self.scale, spec.conv1d)
            for name, spec in self.specs.items()
        }

    def peft_lora_pair(self, state: State, module: str) -> dict[str, torch.Tensor]:
        """The (lora_A, lora_B) pair that PEFT's LoRA holds for this module's adapter (same scale)."""
        return {"lora_A": state[key(module, "lora_A")], "lora_B": state[key(module, "lora_B")]}

    def export_note(self) -> str:
        """What a user loading the exported PEFT adapter must know about this method."""
        if self.residual:
            return (f"{self.label}'s accumulated residual is dense (not low-rank), so this adapter alone is "
                    "NOT the trained model: ../merged/ holds the exact merged model (save_pretrained).\n")
        return ""

    def parameters_per_round(self) -> int:
        """Adapter parameters one client uploads per round (closed form; head excluded)."""
        return sum(math.prod(shape) for shape in self.component_shapes(self.trainable).values())

    def component_shapes(self, components: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
        """Shapes of the given adapter components for every module, by state key."""
        shapes = {}
        for name, spec in self.specs.items():
            m, n, r = spec.out_features, spec.in_features, self.rank
            all_shapes = {"lora_A": (r, n), "lora_B": (m, r), "residual": spec.weight_layout}
            if self.adapter_kind == "lora_sb":
                all_shapes["lora_R"] = (r, r)
            for c in components:
                if c in all_shapes:
                    shapes[key(name, c)] = all_shapes[c]
        return shapes
