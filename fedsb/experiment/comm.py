"""Closed-form communication counts: what each method sends, per component and direction.

The counts are derived from the methods themselves, not from a table: a *symbolic* global
state (tensors on the `meta` device, which have shapes but no storage) is passed through
`method.download(state, first_time)` and `method.upload(state)`, and the elements of what
comes back are counted per component. So a method that changes what it sends changes its
closed form too, and the figures are the ones the communication meter (docs/architecture.md section 4)
should measure on the wire: parameter count x bytes per element.

Components (the meter's names): `lora_A`, `lora_B`, `lora_R`, `residual`, `head`, and `init`,
the tensors a client downloads once, the first time it is sampled (`method.sent_once`: FFA-LoRA's
and Fed-SB's frozen factors, LoRA-GA's base offset B0 and A0; nothing for OLoRA and PiSSA, which each
client computes from the pretrained weights), plus, when a gradient-based init's gradient comes from
the clients (docs/architecture.md section 3), the dense gradient a client uploads once.

Typical use, one client, comparing with a meter::

    counts = count(model, "fedsb", rank=200, num_clients=25)
    count(model, "ffa", rank=8, init="lora_ga", init_gradients=True)   # + each client's gradient upload
    counts.components("up")                      # {'lora_R': ..., 'head': ...}, every round
    counts.components("down", first_time=True)   # adds {'init': ...} for a client's first round
    counts.bytes("up"), counts.bytes("up", all_clients=True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from fedsb.core.adapters import (
    COMPONENTS,
    HEAD,
    OFFSET_COMPONENTS,
    State,
    component_of,
    extract_state,
    target_specs,
)
from fedsb.core.catalog import shipped_configs
from fedsb.core.models import (
    DEFAULT_MODEL,
    MODEL_CONFIG_DIR,
    TASKS,
    TINY_MODELS,
    find_target_modules,
    meta_model,
    model_from_config,
    resolve_model_source,
    tiny_config,
)
from fedsb.experiment.meter import DIRECTIONS, INIT, check_direction
from fedsb.methods import get_method, method_names
from fedsb.methods.base import FederatedMethod

# The order tables print them in. The base offset's factors (B0, A0) travel only in the init record,
# where the meter counts every tensor as `init`.
METER_COMPONENTS = (*(c for c in COMPONENTS if c not in OFFSET_COMPONENTS), HEAD, INIT)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class CommCounts:
    """Parameter counts one client sends (`up`) and receives (`down`), per component.

    `per_round` holds what a client exchanges in every round it is sampled; `one_time` holds
    the `init` component, exchanged only the first time a client is sampled (so a client's
    first round carries `per_round` plus `one_time`). Bytes are parameters x bytes per element.
    """

    method: str
    rank: int
    num_clients: int = 1  # K, clients sampled per round: multiplies the all-clients figures
    init: str = "kaiming"  # the adapter init (method.init.name)
    bytes_per_element: int = 4
    client_rank: int | None = None  # a client holding a lower rank than `rank` (fedsb.methods.ranks)
    per_round: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    one_time: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def components(self, direction: str, *, first_time: bool = False) -> dict[str, int]:
        """Parameters per component for one client in one round (`first_time` adds `init`)."""
        check_direction(direction)
        counts = dict(self.per_round.get(direction, {}))
        if first_time:
            for component, n in self.one_time.get(direction, {}).items():
                counts[component] = counts.get(component, 0) + n
        return {c: n for c, n in counts.items() if n}

    def component_bytes(self, direction: str, *, first_time: bool = False) -> dict[str, int]:
        """Bytes per component for one client in one round."""
        return {c: n * self.bytes_per_element
                for c, n in self.components(direction, first_time=first_time).items()}

    def params(self, direction: str, *, first_time: bool = False, all_clients: bool = False) -> int:
        """Parameters in one round: one client, or all `num_clients` clients together."""
        total = sum(self.components(direction, first_time=first_time).values())
        return total * (self.num_clients if all_clients else 1)

    def bytes(self, direction: str, *, first_time: bool = False, all_clients: bool = False) -> int:
        """Bytes in one round: one client, or all `num_clients` clients together."""
        return self.params(direction, first_time=first_time, all_clients=all_clients) * self.bytes_per_element

    def init_params(self, direction: str = "down") -> int:
        """One-time (`init`) parameters one client exchanges, the first time it is sampled."""
        check_direction(direction)
        return sum(self.one_time.get(direction, {}).values())

    def init_bytes(self, direction: str = "down") -> int:
        return self.init_params(direction) * self.bytes_per_element

    @property
    def up(self) -> int:
        """Parameters one client uploads per round."""
        return self.params("up")

    @property
    def down(self) -> int:
        """Parameters one client downloads per round (after its first)."""
        return self.params("down")

    def to_dict(self) -> dict[str, Any]:
        """Every figure as plain numbers (for JSON output and run logs)."""
        out: dict[str, Any] = {
            "method": self.method, "rank": self.rank, "init": self.init, "num_clients": self.num_clients,
            "client_rank": self.client_rank if self.client_rank is not None else self.rank,
            "bytes_per_element": self.bytes_per_element,
        }
        for d in DIRECTIONS:
            out[d] = {
                "per_round_components": self.components(d),
                "per_round_params": self.params(d),
                "per_round_bytes": self.bytes(d),
                "all_clients_per_round_params": self.params(d, all_clients=True),
                "all_clients_per_round_bytes": self.bytes(d, all_clients=True),
                "init_params": self.init_params(d),
                "init_bytes": self.init_bytes(d),
                "first_round_params": self.params(d, first_time=True),
                "first_round_bytes": self.bytes(d, first_time=True),
            }
        return out


def global_state_shapes(method: FederatedMethod, head: int | Mapping[str, Sequence[int]] = 0
                        ) -> dict[str, Shape]:
    """Shapes of the method's whole global state, by state key: adapter tensors and head.

    The adapter components are those an `AdapterLayer` of the method's kind holds (`method.held`: A and
    B; R for LoRA-SB; the dense residual, in the base weight's layout, if `method.residual`; the base
    offset's B0 and A0 if its init has one).
    `head` is either the head's tensor shapes by key (see `head_shapes`) or a parameter count.
    """
    shapes: dict[str, Shape] = dict(method.component_shapes(method.held))
    if isinstance(head, Mapping):
        for k, shape in head.items():
            if component_of(k) != HEAD:
                raise ValueError(f"head key {k!r} looks like an adapter key")
            shapes[k] = tuple(shape)
    elif head:
        shapes[HEAD] = (int(head),)  # component_of("head") is HEAD
    return shapes


def _count(state: State) -> dict[str, int]:
    counts: dict[str, int] = {}
    for k, tensor in state.items():
        c = component_of(k)
        counts[c] = counts.get(c, 0) + tensor.numel()
    return counts


def closed_form(
    method: FederatedMethod,
    bytes_per_element: int = 4,
    num_clients: int = 1,
    head: int | Mapping[str, Sequence[int]] = 0,
    init_gradients: bool = False,
    client_rank: int | None = None,
) -> CommCounts:
    """Closed-form counts of `method` (its specs and rank), asking its own download/upload, for a
    client of `client_rank` (None: the global rank; a lower one exchanges its rank's prefix).

    - down, every round: `method.download(state, first_time=False)` (every global tensor
      except the fixed ones, `method.fixed`; FedEx-LoRA's dense accumulated residual included);
    - down, once per client (`init`): what `download(state, first_time=True)` adds;
    - up, every round: `method.upload(state)` (the trained components plus the head);
    - up, once (`init`), only if `init_gradients` (the init gradient comes from the clients) and the
      method's init is gradient-based (LoRA-SB, LoRA-GA): the dense m x n gradient per module.
    """
    if bytes_per_element <= 0 or num_clients <= 0:
        raise ValueError("bytes_per_element and num_clients must be positive")
    # Meta tensors: the methods filter and return them like real ones, at no memory cost.
    state = {k: torch.empty(shape, device="meta") for k, shape in global_state_shapes(method, head).items()}
    if client_rank is not None and client_rank != method.rank and not method.rank_aggregations:
        raise ValueError(f"{method.label}'s clients all hold the global rank {method.rank}")
    every_round = method.download(state, first_time=False, rank=client_rank)
    first = method.download(state, first_time=True, rank=client_rank)
    once_down = sum(t.numel() for k, t in first.items() if k not in every_round)
    once_up = 0
    if init_gradients and method.init_gradients:
        once_up = sum(spec.out_features * spec.in_features for spec in method.specs.values())
    return CommCounts(
        method=method.name, rank=method.rank, init=method.init.name, num_clients=num_clients,
        bytes_per_element=bytes_per_element, client_rank=client_rank,
        per_round={"up": _count(method.upload(state, client_rank)), "down": _count(every_round)},
        one_time={"up": {INIT: once_up} if once_up else {}, "down": {INIT: once_down} if once_down else {}},
    )


def factored_residual_params(method: FederatedMethod, num_clients: int) -> int:
    """Per client per round, a residual method's download if the residual were sent factored.

    The exact new product s * sum_i w_i B_i A_i can be sent as the stacked factors
    [w_1 B_1 ... w_K B_K] (m x K r) and [A_1; ...; A_K] (K r x n): K r (m + n) per module,
    which is how the Fed-SB paper counts FedEx-LoRA. The simulator sends the dense residual.
    """
    if not method.residual:
        raise ValueError(f"method {method.name!r} has no residual")
    return num_clients * sum(method.rank * (s.out_features + s.in_features) for s in method.specs.values())


def head_shapes(model: nn.Module) -> dict[str, Shape]:
    """Shapes of the model's trained task-head tensors by state key (empty if it has none)."""
    # extract_state is what the methods put in the global state; on a meta model it is free.
    return {k: tuple(t.shape) for k, t in extract_state(model, (HEAD,)).items()}


def method_for_model(model: nn.Module, method: str, rank: int, targets: Sequence[str] | None = None,
                 alpha: float | None = None, **options: Any) -> FederatedMethod:
    """A method instance for the model's target modules, without injecting adapters.

    `targets` are module-name patterns (None: the architecture's defaults). The model is left
    untouched, so one (meta) model can serve every method.
    """
    names = find_target_modules(model, None if targets is None else tuple(targets))
    cls = get_method(method)
    return cls(target_specs(model, names), rank, float(rank if alpha is None else alpha), **options)


def count(model: nn.Module, method: str, rank: int, targets: Sequence[str] | None = None,
          num_clients: int = 1, bytes_per_element: int = 4, init_gradients: bool = False,
          init: str | None = None, client_rank: int | None = None) -> CommCounts:
    """Closed-form counts of `method` at `rank` on `model` (real or meta), head included, with the
    named init (None: the method's default), for a client of `client_rank` (None: `rank`)."""
    instance = method_for_model(model, method, rank, targets, init=init)
    return closed_form(instance, bytes_per_element, num_clients, head_shapes(model), init_gradients,
                       client_rank)


# Models for accounting: shapes only, never weights -----------------------------------------

@dataclass(frozen=True)
class AccountingModel:
    model: PreTrainedModel  # on the meta device
    name: str
    source: str  # where the architecture came from, in words


def _meta_from_config(config: PretrainedConfig, task: str) -> PreTrainedModel:
    with torch.device("meta"):
        return model_from_config(config, task)


def _is_config_file(name: str) -> bool:
    path = Path(name).expanduser()
    return path.is_file() or (MODEL_CONFIG_DIR / f"{name}.json").is_file()


def default_task(name: str) -> str:
    """causal_lm for architecture configs (the papers' decoder LLMs), else classification."""
    return "causal_lm" if _is_config_file(name) else "classification"


def accounting_model(name: str, task: str | None = None, num_labels: int = 2) -> AccountingModel:
    """Build a model on the meta device (no weights, no download) for counting.

    `name`: a tiny test model, a shipped config short name or a config JSON path, 'default'
    (the packaged MiniLM), a local model directory, or a hub id already in the local cache.
    """
    task = task or default_task(name)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
    if name in TINY_MODELS:
        return AccountingModel(_meta_from_config(tiny_config(name, task, num_labels), task), name,
                               "tiny test model")
    if _is_config_file(name):
        model = meta_model(name, task)
        if task == "classification" and model.config.num_labels != num_labels:
            config = model.config
            config.num_labels = num_labels  # the head's size; rebuilding on meta is free
            model = _meta_from_config(config, task)
        return AccountingModel(model, name, "architecture config")
    source = resolve_model_source(name)
    try:
        # Only the config is read; local_files_only keeps a hub id from reaching the internet.
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError as err:
        raise ValueError(
            f"model {name!r} is not a tiny test model ({', '.join(TINY_MODELS)}), a shipped config "
            f"({', '.join(shipped_configs())}), a config JSON file, {DEFAULT_MODEL!r}, a local model "
            f"directory, or a cached hub id"
        ) from err
    if task == "classification":
        config.num_labels = num_labels
    where = "packaged MiniLM config" if name == DEFAULT_MODEL else f"config of {source}"
    return AccountingModel(_meta_from_config(config, task), name, where)


def count_methods(model: nn.Module, methods: Sequence[str], ranks: Mapping[str, int],
                  targets: Sequence[str] | None = None, num_clients: int = 1, bytes_per_element: int = 4,
                  init_gradients: bool = False, init: str | None = None) -> dict[str, CommCounts]:
    """Counts for several methods, each at its own rank (`ranks[name]`). `init` applies to the methods
    that accept it; the others keep their default (Fed-SB its LoRA-SB), which their counts name."""
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; accepted: {', '.join(method_names())}")
    return {m: count(model, m, ranks[m], targets, num_clients, bytes_per_element, init_gradients,
                     init if init in get_method(m).accepted_inits() else None)
            for m in methods}


# Human-readable numbers ----------------------------------------------------------------------

def human_count(n: float) -> str:
    """11760000 -> '11.76M' (4 significant digits, decimal prefixes, as papers count)."""
    n = float(f"{n:.4g}")  # round first, so 999,960 reads '1.000M', not '1000k'
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{_sig4(n / factor)}{suffix}"
    return str(int(n))


def human_bytes(n: float) -> str:
    """47040000 -> '47.04 MB' (decimal units)."""
    n = float(f"{n:.4g}")
    for factor, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= factor:
            return f"{_sig4(n / factor)} {unit}"
    return f"{int(n)} B"


def _sig4(x: float) -> str:
    digits = max(0, 3 - int(math.floor(math.log10(abs(x))))) if x else 0
    return f"{x:.{digits}f}"
