"""The interface every federated method implements (docs/architecture.md section 2).

A method answers four questions on plain dicts of tensors (see `fedsb.core.adapters.State`):
1. adapter: which adapter a client holds (`adapter_kind`, `residual`), how it starts (the init
   chosen among those of its adapter kind, `fedsb.core.init_choices`), and what it trains
   (`trainable`; the task head is always trained);
2. upload: which tensors a client sends after local training (`upload`);
3. aggregate: how the server combines the uploads (`aggregate`);
4. download: which tensors the server sends before local training (`download`), including
   the one-time tensors (`one_time`) a client receives the first time it is sampled.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from fedsb.core.adapters import (
    COMPONENTS,
    HEAD,
    INITIAL_VALUE_OF,
    OFFSET_COMPONENTS,
    ModuleSpec,
    State,
    adapter_layer_class,
    base_weights,
    component_of,
    delta_weight,
    extract_state,
    inject_adapters,
    key,
)
from fedsb.core.init import InitInputs, adapter_init
from fedsb.core.init_choices import InitChoice, get_init, init_names
from fedsb.methods.ranks import RANK_DIM, aggregate_factors, pad, state_rank, truncate


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
    adapter_kind: ClassVar[str] = "lora"
    # The init when method.init.name is not given; the method accepts every init of its adapter kind.
    default_init: ClassVar[str] = "kaiming"
    residual: ClassVar[bool] = False
    # Exact aggregation: the aggregate's effective update equals the weighted mean of the clients'
    # effective updates (tests/test_methods.py holds every method that declares it to it).
    exact: ClassVar[bool] = True
    trainable: ClassVar[tuple[str, ...]]  # adapter components a client trains
    # Components a client downloads once only (frozen after the init, e.g. FFA-LoRA's A).
    one_time: ClassVar[tuple[str, ...]] = ()
    # How the method can combine clients of different ranks (fedsb.methods.ranks: pad, rank_aware,
    # svd); empty: every client holds the global rank (federation.client_ranks must be null) and
    # nested-rank training does not apply.
    rank_aggregations: ClassVar[tuple[str, ...]] = ()

    def __init__(self, specs: Mapping[str, ModuleSpec], rank: int, alpha: float, init: str | None = None,
                 rank_aggregation: str = "pad"):
        if rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        self.specs = dict(specs)
        self.rank = rank
        self.alpha = alpha
        self.init: InitChoice = self.init_for(init)
        self.rank_aggregation = rank_aggregation

    # 0. The init --------------------------------------------------------------------------
    @classmethod
    def accepted_inits(cls) -> list[str]:
        """The inits this method accepts (method.init.name): those of its adapter kind."""
        return [n for n in init_names() if get_init(n).adapter_kind == cls.adapter_kind]

    @classmethod
    def init_for(cls, name: str | None) -> InitChoice:
        """The named init (None: the method's default), if the method accepts it."""
        name = cls.default_init if name is None else name
        if name not in cls.accepted_inits():
            raise ValueError(f"method.init.name: got {name!r}; accepted with method.name={cls.name}: "
                             + ", ".join(repr(n) for n in cls.accepted_inits()))
        return get_init(name)

    @classmethod
    def needs_init_gradients(cls, init: str | None = None) -> bool:
        """Whether the method's init (the named one, or its default) needs the target weights' gradients.
        A method with an init of its own (overriding initial_adapter_state) declares `init_gradients`."""
        declared = inspect.getattr_static(cls, "init_gradients")
        return declared if isinstance(declared, bool) else cls.init_for(init).needs_gradients

    @property
    def init_gradients(self) -> bool:
        """Whether initial_adapter_state needs the gradients of the target weights (a gradient-based init);
        the config's method.init.source says where they come from (server, clients or pooled data)."""
        return self.init.needs_gradients

    @property
    def fixed(self) -> tuple[str, ...]:
        """Components fixed from the init on: the one-time ones and the init's base offset (B0, A0)."""
        return (*self.one_time, *(OFFSET_COMPONENTS if self.init.offsets_base else ()))

    @property
    def sent_once(self) -> tuple[str, ...]:
        """The fixed components the server sends a client once (in the `init` record): nothing when every
        client computes them itself from the pretrained weights (a local init: OLoRA, PiSSA); an offset
        factor is not sent when it is a copy of a one-time component (FFA-LoRA's A0 is its frozen A)."""
        if self.init.local:
            return ()
        return tuple(c for c in self.fixed if INITIAL_VALUE_OF.get(c) not in self.one_time)

    @property
    def held(self) -> tuple[str, ...]:
        """The components a client's adapter layers hold (the global state's, less the head)."""
        declared = adapter_layer_class(self.adapter_kind).components
        if declared is not None:  # a block adapter's (fedsb.core.block_adapters)
            return declared
        held = ["lora_A", "lora_B", *(["lora_R"] if self.adapter_kind == "lora_sb" else [])]
        held += ["residual"] if self.residual else []
        held += list(OFFSET_COMPONENTS) if self.init.offsets_base else []
        return tuple(held)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    # 1. Adapter -----------------------------------------------------------------------------
    def inject(self, model: nn.Module) -> None:
        """Wrap the model's target modules (those of `specs`) in this method's adapter layers."""
        inject_adapters(model, list(self.specs), self.rank, self.alpha, self.adapter_kind, self.residual,
                        self.init.offsets_base)

    @property
    def trained(self) -> tuple[str, ...]:
        """Every component a client trains: the method's adapter components plus the head."""
        return (*self.trainable, HEAD)

    def initial_adapter_state(self, generator: torch.Generator,
                              gradients: Mapping[str, torch.Tensor] | None = None,
                              lr_eff: float | None = None,
                              weights: Mapping[str, torch.Tensor] | None = None) -> State:
        """The global adapter tensors before round 1, from the configured init (`self.init`). A
        gradient-based init uses `gradients` (and LoRA-SB `lr_eff`, the learning rate of its
        first-update estimate); OLoRA and PiSSA the pretrained `weights` (out x in)."""
        inputs = InitInputs(self.specs, self.rank, self.scale, generator, weights, gradients, lr_eff)
        return adapter_init(self.init, inputs)

    def initial_state(self, model: nn.Module, generator: torch.Generator,
                      gradients: Mapping[str, torch.Tensor] | None = None, lr_eff: float | None = None
                      ) -> State:
        """The whole global state before round 1: adapter tensors, the base offset (B0, A0: the initial
        B and A, when the init takes their product out of the frozen weight), residuals, the head."""
        # Only an init that reads the pretrained weights is given them (a method's own
        # initial_adapter_state may not take them).
        weights = ({"weights": base_weights(model, list(self.specs))}
                   if self.init.computed_from == "weights" else {})
        state = self.initial_adapter_state(generator, gradients, lr_eff, **weights)
        if self.init.offsets_base:
            for offset, component in INITIAL_VALUE_OF.items():
                for name in self.specs:
                    state[key(name, offset)] = state[key(name, component)].clone()
        if self.residual:
            for name, spec in self.specs.items():
                state[key(name, "residual")] = torch.zeros(spec.weight_layout)
        state.update(extract_state(model, (HEAD,)))
        return state

    # 2. Upload ------------------------------------------------------------------------------
    def upload(self, local_state: State, rank: int | None = None) -> State:
        """What a client sends after local training: the tensors it trained (a client of a lower
        `rank` than the global's, their rank-`rank` prefix: fedsb.methods.ranks)."""
        trained = {k: v for k, v in local_state.items() if component_of(k) in self.trained}
        return trained if rank is None or rank == self.rank else truncate(trained, rank)

    def validate_upload(self, upload: State, global_state: State, rank: int | None = None) -> None:
        """Raise InvalidUpdate unless the upload has exactly the expected keys, shapes (those of a client
        of `rank`; None: the global rank) and finite values."""
        expected = self.upload(global_state, rank)
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
        sliced = [c for c in self.trainable if c in RANK_DIM]
        full_rank = all(state_rank(u) in (None, self.rank) for u in uploads)
        if sliced and (self.rank_aggregation == "svd" or not full_rank):  # clients of different ranks
            new_state.update(aggregate_factors(self.rank_aggregation, global_state, uploads, w,
                                               list(self.specs), sliced))
        for k in self.upload(global_state):
            if component_of(k) not in sliced or (full_rank and self.rank_aggregation != "svd"):
                new_state[k] = weighted_mean([u[k] for u in uploads], w)
        return new_state

    # 4. Download ----------------------------------------------------------------------------
    def download(self, global_state: State, first_time: bool, rank: int | None = None) -> State:
        """What the server sends a client before local training; the fixed tensors only once, and only
        those a client cannot compute itself (`sent_once`). A client of a lower `rank` than the
        global's gets the rank-`rank` prefix of the LoRA factors (fedsb.methods.ranks)."""
        sent = {k: v for k, v in global_state.items()
                if component_of(k) not in self.fixed or (first_time and component_of(k) in self.sent_once)}
        return sent if rank is None or rank == self.rank else truncate(sent, rank)

    def client_state(self, received: State, computed: State) -> State:
        """A client's full state: what it received (this round's download and the one-time tensors),
        completed with the fixed tensors it was not sent: those it `computed` itself (a local init's,
        from the pretrained weights) and the offset factors that equal a one-time component it holds.
        A lower-rank client's factors are zero-padded to the global rank (its layers mask the rest)."""
        state = {**computed, **pad(received, self.rank)}
        for offset, component in INITIAL_VALUE_OF.items():
            if offset in self.fixed:
                for name in self.specs:
                    state.setdefault(key(name, offset), state[key(name, component)])
        return state

    # Helpers shared by tests, the meter and the export --------------------------------------
    def effective_delta(self, state: State) -> dict[str, torch.Tensor]:
        """Per module, the adapter's contribution to the effective weight (out x in)."""
        return {
            name: delta_weight({c: state[key(name, c)] for c in COMPONENTS if key(name, c) in state},
                               self.scale, spec.conv1d)
            for name, spec in self.specs.items()
        }

    def peft_lora_pair(self, state: State, module: str) -> dict[str, torch.Tensor]:
        """The (lora_A, lora_B) pair that PEFT's LoRA holds for this module's adapter (same scale),
        relative to the ORIGINAL base weight: with a base offset, s (B A - B0 A0) is the rank-2r pair
        [A; A0], [B, -B0] (at alpha 2 alpha: the same scale), as PEFT converts PiSSA, OLoRA and
        LoRA-GA adapters (`path_initial_model_for_weight_conversion`)."""
        a, b = state[key(module, "lora_A")], state[key(module, "lora_B")]
        if self.init.offsets_base:
            a = torch.cat([a, state[key(module, "lora_A0")]], dim=0)
            b = torch.cat([b, -state[key(module, "lora_B0")]], dim=1)
        return {"lora_A": a, "lora_B": b}

    @property
    def export_rank(self) -> int:
        """The rank of the exported PEFT adapter: 2r with a base offset (see peft_lora_pair)."""
        return 2 * self.rank if self.init.offsets_base else self.rank

    def export_note(self) -> str:
        """What a user loading the exported PEFT adapter must know about this method (and its init)."""
        note = ""
        if self.init.offsets_base:
            note += (f"The {self.init.label} init took s B0 A0 out of the frozen weight; as PEFT converts "
                     "such adapters, this one is relative to the ORIGINAL base weights: rank "
                     f"{self.export_rank} = [B, -B0] [A; A0], alpha doubled (the same scale).\n")
        if self.residual:
            note += (f"{self.label}'s accumulated residual is dense (not low-rank), so this adapter alone is "
                     "NOT the trained model: ../merged/ holds the exact merged model (save_pretrained).\n")
        return note

    @classmethod
    def shape_problem(cls, specs: Mapping[str, ModuleSpec], rank: int) -> str | None:
        """What method.rank must be, if the target modules' shapes rule this one out (else None); LoRA's
        bound, rank <= the smaller dimension, is checked for every method by the run's plan."""
        layer = adapter_layer_class(cls.adapter_kind)
        if layer.components is None:
            return None
        return next(filter(None, (layer.shape_problem(spec, rank) for spec in specs.values())), None)

    def write_export(self, run_dir: Path, base_model: nn.Module, state: State, task: str) -> Path | None:
        """Write this method's own export where it is not a PEFT LoRA adapter (another PEFT adapter type,
        or the exact merged model) and return its directory; None: `fedsb.experiment.export` writes the
        PEFT LoRA adapter (`peft_lora_pair`)."""
        return None

    def parameters_per_round(self) -> int:
        """Adapter parameters one client uploads per round (closed form; head excluded)."""
        return sum(math.prod(shape) for shape in self.component_shapes(self.trainable).values())

    def component_shapes(self, components: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
        """Shapes of the given adapter components for every module, by state key."""
        shapes = {}
        layer = adapter_layer_class(self.adapter_kind)
        for name, spec in self.specs.items():
            if layer.components is not None:  # a block adapter declares its shapes
                declared = layer.shapes(spec, self.rank)
                shapes.update({key(name, c): declared[c] for c in components if c in declared})
                continue
            m, n, r = spec.out_features, spec.in_features, self.rank
            all_shapes = {"lora_A": (r, n), "lora_B": (m, r), "residual": spec.weight_layout,
                          "lora_A0": (r, n), "lora_B0": (m, r)}
            if self.adapter_kind == "lora_sb":
                all_shapes["lora_R"] = (r, r)
            for c in components:
                if c in all_shapes:
                    shapes[key(name, c)] = all_shapes[c]
        return shapes
