"""One typed experiment config: YAML file + dotted overrides, validated before any training.

Every error is a ConfigError whose message is one line naming the key and what is accepted.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

METHOD_NAMES = ("fedit", "ffa", "fedex", "fedsb")


class ConfigError(ValueError):
    """A bad config value: the message names the key and what is accepted."""


@dataclass
class ModelConfig:
    name: str = "default"  # 'default' (packaged MiniLM), tiny-bert|tiny-llama|tiny-gpt2, a dir, a hub id
    task: Literal["classification", "causal_lm"] = "classification"
    max_length: int = 48
    target_modules: list[str] | None = None  # None: the architecture's defaults


@dataclass
class DataConfig:
    source: str = "synthetic"  # 'synthetic', a local file (csv/tsv/json/jsonl/parquet), or 'hf:<name>'
    test_file: str | None = None  # a local test file; else test_fraction of the source is held out
    test_fraction: float = 0.2
    text_column: str = "text"
    label_column: str = "label"
    num_examples: int = 4000  # synthetic: examples generated; files: at most this many (0: all)
    num_classes: int = 4  # synthetic only
    max_test_examples: int = 1000  # centralised evaluation set size (0: all)


@dataclass
class PartitionConfig:
    scheme: Literal["iid", "dirichlet", "classes"] = "dirichlet"
    alpha: float = 0.5  # dirichlet concentration: smaller is more label-skewed
    classes_per_client: int = 2  # 'classes' scheme


@dataclass
class InitConfig:
    source: Literal["server", "clients", "pooled"] = "server"  # where LoRA-SB's init gradient comes from
    num_samples: int = 64  # examples whose gradient is accumulated
    lr: float | None = None  # lr_eff of the first-update estimate; None: train.lr


@dataclass
class MethodConfig:
    name: Literal["fedit", "ffa", "fedex", "fedsb"] = "fedsb"
    rank: int = 8
    alpha: float | None = None  # LoRA alpha; None: alpha = rank (scale 1)
    init: InitConfig = field(default_factory=InitConfig)


@dataclass
class FederationConfig:
    num_clients: int = 8
    rounds: int = 5
    clients_per_round: float = 1.0  # a fraction in (0, 1] of num_clients, or an integer count > 1


@dataclass
class TrainConfig:
    local_steps: int = 10
    batch_size: int = 16
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 5e-3


@dataclass
class EvalConfig:
    batch_size: int = 64
    client_eval: bool = False  # also evaluate the global adapter on each client's own data


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    output_dir: str = "runs"  # a run directory is created inside it

    # -- derived values ------------------------------------------------------------------
    @property
    def lora_alpha(self) -> float:
        return float(self.method.alpha if self.method.alpha is not None else self.method.rank)

    @property
    def init_lr(self) -> float:
        return self.method.init.lr if self.method.init.lr is not None else self.train.lr

    def clients_per_round(self) -> int:
        """The cohort size per round."""
        value, total = self.federation.clients_per_round, self.federation.num_clients
        count = round(value * total) if value <= 1 else int(value)
        return max(1, min(count, total))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading, overriding, validating ---------------------------------------------------------

def _accepted(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    args = typing.get_args(tp) or (tp,)
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join("null" if n == "NoneType" else n for n in names)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert) one value against its annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: got {value!r}; accepted: {_accepted(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: got {value!r}; accepted: {_accepted(tp)}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: got {value!r}; accepted: a list of strings")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}; accepted: true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}; accepted: an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {value!r}; accepted: a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}; accepted: a string")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # pragma: no cover - a bug here


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in known:
            raise ConfigError(f"{prefix}{k}: unknown key; accepted keys: {', '.join(sorted(known))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value, full = hints[f.name], data[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value, full + ".")
        else:
            kwargs[f.name] = _coerce(full, value, tp)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'key.sub=value' -> (key.sub, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. method.rank=16")
    k, _, raw = text.partition("=")
    return k.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults), apply dotted overrides, and validate everything."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config: {path} is not valid YAML ({str(err).splitlines()[0]})") from err
    for k, v in (overrides or {}).items():
        _set_dotted(data, k, v)
    config = _build(ExperimentConfig, data, "")
    validate(config)
    return config


def _require(condition: bool, key: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: got {value!r}; accepted: {accepted}")


def validate(c: ExperimentConfig) -> None:
    """Range checks and cross-field checks; file existence for local data."""
    _require(c.model.max_length >= 8, "model.max_length", c.model.max_length, "an integer >= 8")
    _require(c.method.rank > 0, "method.rank", c.method.rank, "a positive integer")
    _require(c.method.alpha is None or c.method.alpha > 0, "method.alpha", c.method.alpha,
             "a positive number or null")
    _require(c.method.init.num_samples > 0, "method.init.num_samples", c.method.init.num_samples,
             "a positive integer")
    _require(c.federation.num_clients >= 1, "federation.num_clients", c.federation.num_clients,
             "an integer >= 1")
    _require(c.federation.rounds >= 1, "federation.rounds", c.federation.rounds, "an integer >= 1")
    cpr = c.federation.clients_per_round
    _require(0 < cpr <= 1 or (cpr > 1 and float(cpr).is_integer() and cpr <= c.federation.num_clients),
             "federation.clients_per_round", cpr,
             f"a fraction in (0, 1] or a count <= federation.num_clients ({c.federation.num_clients})")
    _require(c.train.local_steps >= 1, "train.local_steps", c.train.local_steps, "an integer >= 1")
    _require(c.train.batch_size >= 1, "train.batch_size", c.train.batch_size, "an integer >= 1")
    _require(c.train.lr > 0, "train.lr", c.train.lr, "a positive number")
    _require(c.eval.batch_size >= 1, "eval.batch_size", c.eval.batch_size, "an integer >= 1")
    _require(c.partition.alpha > 0, "partition.alpha", c.partition.alpha, "a positive number")
    _require(c.partition.classes_per_client >= 1, "partition.classes_per_client",
             c.partition.classes_per_client, "an integer >= 1")
    _require(0 < c.data.test_fraction < 1, "data.test_fraction", c.data.test_fraction,
             "a number in (0, 1)")
    _require(c.data.num_examples >= 0, "data.num_examples", c.data.num_examples, "an integer >= 0")
    _require(c.data.num_classes >= 2, "data.num_classes", c.data.num_classes, "an integer >= 2")
    source = c.data.source
    if source != "synthetic" and not source.startswith("hf:"):
        _require(Path(source).expanduser().is_file(), "data.source", source,
                 "'synthetic', 'hf:<dataset name>', or an existing csv/tsv/json/jsonl/parquet file")
    if c.data.test_file is not None:
        _require(Path(c.data.test_file).expanduser().is_file(), "data.test_file", c.data.test_file,
                 "an existing file or null")
