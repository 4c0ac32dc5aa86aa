"""One typed experiment config: YAML file + dotted overrides, validated before any training.

Every error is a ConfigError whose message is one line naming the key and what is accepted.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fedsb.experiment.validation import ConfigError, validate


class NumberLoader(yaml.SafeLoader):
    """YAML's safe loader, reading numbers as YAML 1.2 and Python do: 1e-3, 5E-4, .5, 1_000.

    PyYAML implements YAML 1.1, where a float needs a dot: `lr: 1e-3` would be the string '1e-3'.
    """


NumberLoader.yaml_implicit_resolvers = {
    k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
NumberLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?)$"),
    list("-+0123456789."))


def _construct_number(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | float:
    """An integer where the text is one (1_000 -> 1000), else a float (1e-3 -> 0.001)."""
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        return int(text)
    except ValueError:
        return loader.construct_yaml_float(node)


NumberLoader.add_constructor("tag:yaml.org,2002:float", _construct_number)


def load_yaml(text: str) -> Any:
    """Parse YAML text with `NumberLoader` (every config file, override and sweep file goes through here)."""
    return yaml.load(text, Loader=NumberLoader)  # noqa: S506 - NumberLoader is a SafeLoader


@dataclass
class ModelConfig:
    name: str = "default"  # 'default' (packaged MiniLM), tiny-bert|tiny-llama|tiny-gpt2, a dir, a hub id
    task: Literal["classification", "causal_lm"] = "classification"  # a classifier head, or causal-LM tuning
    max_length: int = 48  # tokens per example
    # Module name patterns to adapt; None: the architecture's defaults.
    target_modules: list[str] | None = None
    # Where the base model, adapters and batches live: auto (CUDA when available), cpu, cuda, cuda:N.
    device: str = "auto"
    # The frozen base weights' precision (auto: bfloat16 on a GPU that supports it, else float32).
    # Adapters, the head, optimiser state, aggregation and the wire stay float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


# The generated tasks (no file, no hub), by model.task: the topics and the arithmetic instructions.
GENERATED_SOURCES = {"classification": "synthetic", "causal_lm": "arithmetic"}


def is_file_source(source: str) -> bool:
    """A local data file (as opposed to a generated task or 'hf:<name>')."""
    return source not in GENERATED_SOURCES.values() and not source.startswith("hf:")


@dataclass
class DataConfig:
    # 'synthetic' (topics) or 'arithmetic' (instructions: causal_lm), a local file
    # (csv/tsv/json/jsonl/parquet), or 'hf:<name>[:<config>]'
    source: str = "synthetic"
    test_file: str | None = None  # a local test file; else test_fraction of the source is held out
    test_fraction: float = 0.2  # the fraction of the source held out as the test set (no test_file)
    # Column names; with header=false, positions (0, 1 or "0", "1"): integers are kept as their strings.
    text_column: str | int = "text"
    text_pair_column: str | int | None = None  # a second text column: sentence-pair tasks (SNLI's hypothesis)
    label_column: str | int = "label"  # labels: strings or integers
    header: bool = True  # csv/tsv files have a header row; false: columns are named by position "0", "1"...
    drop_unlabelled: bool = False  # drop rows without a label (SNLI's -1 or '-') instead of refusing them
    num_examples: int = 4000  # synthetic: examples generated; files: at most this many (0: all)
    num_classes: int = 4  # synthetic only
    max_test_examples: int = 1000  # centralised evaluation set size (0: all)
    # The server's validation split, which every choice looks at (the best round, a tuned lr): a
    # local file, else this fraction of the training pool held out (clients never see it).
    val_file: str | None = None
    val_fraction: float = 0.1  # held out of the training pool when val_file is null
    max_val_examples: int = 500  # validation set size (0: all)
    # Causal-LM instruction data (model.task=causal_lm): the prompt and response columns, an optional
    # input column (Alpaca's), the prompt template, and label_column as an optional category for
    # label-skewed partitions (null: one category, use partition.scheme=iid).
    prompt_column: str = "prompt"
    response_column: str = "response"  # the response (the only tokens the loss counts)
    input_column: str | None = None  # an optional input column (Alpaca's input)
    # plain: the prompt then "Answer: "; alpaca: Stanford Alpaca's text; chat: the tokenizer's chat template
    template: Literal["plain", "alpaca", "chat"] = "plain"
    # A test set with other column names (MetaMathQA trains, GSM8K's question/answer tests); null: the same.
    # test_file may then be 'hf:<name>[:<config>]' (its test split).
    test_prompt_column: str | None = None
    test_response_column: str | None = None  # the test set's response column; null: response_column

    def __post_init__(self) -> None:
        # A column given by position (data.header=false) as an integer is named by its string.
        for name in ("text_column", "text_pair_column", "label_column"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, str(value))


@dataclass
class PartitionConfig:
    scheme: Literal["iid", "dirichlet", "classes"] = "dirichlet"  # by flwr-datasets' partitioners
    alpha: float = 0.5  # dirichlet concentration: smaller is more label-skewed
    classes_per_client: int = 2  # 'classes' scheme


@dataclass
class InitConfig:
    # The adapter init (fedsb.core.init_choices): kaiming, olora, pissa or lora_ga for the LoRA-based
    # methods, lora_sb for Fed-SB; null: the method's default (kaiming; Fed-SB's lora_sb).
    name: str | None = None
    # Where a gradient-based init's (lora_ga, lora_sb) gradient comes from: the server's split, the
    # clients (uploaded, metered as init, privatised under DP) or the pooled data (an oracle).
    source: Literal["server", "clients", "pooled"] = "server"
    num_samples: int = 64  # examples whose gradient is accumulated
    lr: float | None = None  # LoRA-SB's first-update lr_eff; None: train.lr / client steps in the run


@dataclass
class MethodConfig:
    name: str = "fedsb"  # a registered method (fedsb.methods.method_names())
    rank: int = 8  # LoRA rank (Bone: the block size; MoRA: the LoRA rank its square matrix matches)
    alpha: float | None = None  # LoRA alpha; None: alpha = rank (scale 1); not used by Bone and MoRA
    init: InitConfig = field(default_factory=InitConfig)


@dataclass
class FederationConfig:
    # A count, or 'auto': as many clients as the federation has SuperNodes (a plain `flwr run .` has
    # Flower's default of 2; `fedsb run` and `fedsb demo` start AUTO_CLIENTS, 8).
    num_clients: int | Literal["auto"] = 8
    rounds: int = 5  # federated rounds
    clients_per_round: float = 1.0  # a fraction in (0, 1] of num_clients, or an integer count > 1
    # Aggregation weights: each client's number of training examples (FedAvg), or a plain mean
    # (the Fed-SB authors'; under DP it also keeps a client's dataset size unreleased).
    weighting: Literal["examples", "uniform"] = "examples"
    # The centralised reference (not federated): the same model, adapter and total number of
    # optimiser steps, on all the clients' data pooled in one client (see `centralise`).
    centralised: bool = False
    # Failures: a client that raises or does not reply within round_timeout_s is recorded as failed
    # and the round aggregates the others; with fewer than min_clients valid updates (a count, or a
    # fraction of the cohort) the round is skipped, the global state unchanged; after
    # max_failed_rounds skipped rounds in a row the run stops (resumable from its checkpoint).
    round_timeout_s: float = 3600.0
    min_clients: float = 1  # fewer valid updates in a round skip it (a count, or a fraction of the cohort)
    max_failed_rounds: int = 3  # this many skipped rounds in a row stop the run (resumable)
    # An optional bound on the L2 norm of a client's update (its upload minus the global tensors):
    # a larger one is rejected with its reason. null: no bound.
    max_update_norm: float | None = None
    # Clients of different LoRA ranks (fedsb.methods.ranks), each <= method.rank (the server's):
    # null, every client method.rank; else a list of ranks, assigned by rank_assignment: `random`
    # (each client draws one, seeded), `per_client` (one per client, in partition order) or `by_size`
    # (the clients with more data get the larger ranks). rank_aggregation: how the server combines
    # them: pad (HetLoRA), rank_aware (each slice over its holders) or svd (FlexLoRA).
    client_ranks: list[int] | None = None
    rank_assignment: Literal["random", "per_client", "by_size"] = "random"  # which client gets which rank
    rank_aggregation: Literal["pad", "rank_aware", "svd"] = "pad"  # how the server combines mixed ranks


@dataclass
class TrainConfig:
    local_steps: int = 10  # optimiser steps per client per round
    batch_size: int = 16  # examples per local step
    optimizer: Literal["adamw", "sgd"] = "adamw"  # the local optimiser
    lr: float = 5e-3  # the local learning rate
    # Recompute activations in the backward pass instead of keeping them: less GPU memory for long
    # sequences, about a third more compute per step.
    gradient_checkpointing: bool = False
    # DyLoRA's nested ranks: each local step samples a rank b in 1..r_i (the client's rank) and trains
    # the rank-b prefix, so that every prefix of the adapter stays usable when truncated.
    nested_ranks: bool = False


@dataclass
class EvalConfig:
    batch_size: int = 64  # the server's centralised evaluation, every round
    client_eval: bool = False  # also evaluate the global adapter on each client's own data
    # Causal LMs: exact match of greedily generated answers (every round on validation, and on test).
    max_new_tokens: int = 32
    answer_style: Literal["gsm8k", "last_number"] = "gsm8k"  # '#### <n>', or the last number in the text
    # The global adapter is also tested truncated to these ranks (summary.json's test_accuracy_at_rank);
    # null: with client_ranks or nested_ranks, r/4, r/2 and the client ranks; else none.
    truncated_ranks: list[int] | None = None


# --- privacy (fedsb.experiment.privacy) ---------------------------------------------------------

@dataclass
class PrivacyConfig:
    """Sample-level (epsilon, delta)-DP for each client w.r.t. its own data, by DP-SGD (Opacus).

    delta None means, per client with n local examples, min(1e-5, 1 / (10 n)): always strictly
    below 1/n (see `fedsb.training.privacy.accounting.resolve_delta`). The noise multiplier is
    calibrated once per client for the whole run; `init_noise_multiplier` is the Gaussian noise of
    the privatised Fed-SB init gradient (method.init.source = clients), charged to each client's ledger.
    """

    enabled: bool = False  # DP-SGD (Opacus) on every client's training
    epsilon: float = 3.0  # target epsilon per client, composed over every round
    delta: float | None = None  # None: min(1e-5, 1/(10 n_i)) for a client with n_i examples
    max_grad_norm: float = 1.0  # per-sample clipping norm (training and the private init)
    accountant: Literal["rdp", "prv"] = "rdp"  # Opacus's accountant that composes each client's steps
    init_noise_multiplier: float = 5.0  # init.source=clients: noise std / clipping norm
    allow_pooled_init: bool = False  # init.source=pooled with DP: allowed only if set (not private)
    # Rounds of local steps the noise is calibrated for; None: federation.rounds (no client ever
    # runs out). Fewer: less noise, and a client sampled more often refuses once its budget is spent.
    calibration_rounds: int | None = None


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    seed: int = 0  # everything random derives from the seed
    output_dir: str = "runs"  # a run directory is created inside it
    # Experiment trackers fed every round's metrics and the config (fedsb.experiment.tracking):
    # tensorboard (event files in the run directory), mlflow and wandb (pip extras of those names).
    tracking: list[str] = field(default_factory=list)

    # -- derived values ------------------------------------------------------------------
    @property
    def lora_alpha(self) -> float:
        return float(self.method.alpha if self.method.alpha is not None else self.method.rank)

    @property
    def client_steps(self) -> int:
        """The optimiser steps one client takes over the whole run (if sampled every round)."""
        return self.federation.rounds * self.train.local_steps

    @property
    def init_lr(self) -> float:
        """lr_eff of LoRA-SB's first-update estimate -lr_eff * sign(G).

        The authors' rule: the training lr divided by the number of optimiser steps
        (`eff_lr = lr / (warmup_ratio * total_steps)` in the lora-sb and fed-sb training scripts,
        `lr / (len(train_loader) * local_epochs)` in Fed-SB's private script); here the steps a
        client takes in the run, rounds x local steps. `method.init.lr` overrides it.
        """
        if self.method.init.lr is not None:
            return self.method.init.lr
        return self.train.lr / self.client_steps

    def with_clients(self, count: int) -> ExperimentConfig:
        """This config with federation.num_clients 'auto' resolved to `count` (a count stays as it is)."""
        if self.federation.num_clients != "auto":
            return self
        federation = dataclasses.replace(self.federation, num_clients=count)
        resolved = dataclasses.replace(self, federation=federation)
        validate(resolved)
        return resolved

    def clients_per_round(self) -> int:
        """The cohort size per round."""
        value, total = self.federation.clients_per_round, self.federation.num_clients
        if total == "auto":
            raise ValueError("federation.num_clients is 'auto': known once the SuperNodes are")
        count = round(value * total) if value <= 1 else int(value)
        return max(1, min(count, total))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


AUTO_CLIENTS = 8  # federation.num_clients 'auto' under `fedsb run` and `fedsb demo`, which start the nodes


# --- loading, overriding, validating ---------------------------------------------------------

_LIST_NAMES = {str: "a list of strings", int: "a list of integers"}


def _accepted(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    args = typing.get_args(tp) or (tp,)
    names = [_LIST_NAMES[typing.get_args(a)[0]] if typing.get_origin(a) is list
             else getattr(a, "__name__", str(a)) for a in args]
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
        item = typing.get_args(tp)[0]
        if isinstance(value, str):  # a comma-separated override: target_modules=query,value
            value = [v.strip() for v in value.split(",") if v.strip()]
            if item is int:
                value = [int(v) if v.lstrip("-").isdigit() else v for v in value]
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool)
                                                  for v in value):
            raise ConfigError(f"{key}: got {value!r}; accepted: {_LIST_NAMES[item]}")
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


def flatten(data: typing.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'federation': {'rounds': 3}} -> {'federation.rounds': 3}; dotted keys stay as they are."""
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, typing.Mapping):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """'key.sub=value' -> (key.sub, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. method.rank=16")
    k, _, raw = text.partition("=")
    return k.strip(), load_yaml(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults), apply dotted overrides, and validate everything."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: file {path} does not exist")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config: {path} is not valid YAML ({str(err).splitlines()[0]})") from err
    for k, v in (overrides or {}).items():
        _set_dotted(data, k, v)
    config = _build(ExperimentConfig, data, "")
    validate(config)
    return centralise(config) if config.federation.centralised else config


def centralise(config: ExperimentConfig) -> ExperimentConfig:
    """The centralised reference of a federated config: one client holding the pool of every
    client's data, taking per round the steps the whole cohort took (cohort x local steps), so
    that the model, the adapter, the data and the total number of optimiser steps are the same.

    Idempotent (a centralised config has a cohort of one), so a resolved config.yaml reloads
    to itself. The learning rate is the config's own: a sweep tunes it like any other setting's.
    """
    cohort = config.clients_per_round()
    c = dataclasses.replace(
        config,
        # One client at the global rank: the reference is the full-rank adapter on the pooled data.
        federation=dataclasses.replace(config.federation, num_clients=1, clients_per_round=1.0,
                                       client_ranks=None),
        train=dataclasses.replace(config.train, local_steps=config.train.local_steps * cohort),
        partition=dataclasses.replace(config.partition, scheme="iid"),
    )
    validate(c)
    return c
