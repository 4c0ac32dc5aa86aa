"""What a run will do, checked before it starts: `fedsb run CONFIG --check` and every run's first step.

`check_plan(config)` is the one place where a run's inputs are tried before any Flower process
starts: the output directory, the data (loaded, split and partitioned exactly as the Worker does,
`fedsb.experiment.task`), the base model (its config and tokenizer; the architecture is built on the
meta device, shapes without weights, as `fedsb comm` does), the target modules and the rank
against their shapes, and under DP each client's delta and noise calibration. It returns a `Plan`
(what `fedsb run --check` prints with `format_plan`), or raises a `CheckError`: one line naming
the config key and what is accepted. The config itself is validated earlier, by `load_config`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled
from transformers import AutoConfig, PreTrainedModel

import fedsb.experiment.comm as comm
from fedsb.core.adapters import target_specs
from fedsb.core.models import (
    DEFAULT_MODEL,
    ENCODERS,
    TINY_MODELS,
    find_target_modules,
    load_tokenizer,
    model_from_config,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
    tiny_config,
    weight_shape,
)
from fedsb.data.partition import partition_dataset
from fedsb.data.schema import DataError, MissingColumnError, UnknownLabelsError, short
from fedsb.experiment.config import ExperimentConfig
from fedsb.experiment.task import load_splits
from fedsb.experiment.validation import ConfigError
from fedsb.methods import get_method

MIN_EXAMPLES_PER_CLIENT = 2  # a client needs a batch of more than one example to be worth training
SHOWN_TARGETS = 3  # target module names the plan lists before "..."
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CheckError(ConfigError):
    """An input a run cannot use: one line naming the config key and what is accepted."""


@dataclass(frozen=True)
class ClientPrivacy:
    """One client's DP calibration: its examples, its delta, the noise multiplier of its DP-SGD."""

    client: int
    num_examples: int
    delta: float
    noise_multiplier: float


@dataclass(frozen=True)
class Plan:
    """A checked run: the model, its targets, the data sizes, the partitions, the bytes, privacy."""

    config: ExperimentConfig
    model_type: str
    device: str
    dtype: str
    targets: list[str]  # target module names, in model order
    target_shapes: list[tuple[int, int]]  # (out, in) of each target
    head_params: int  # the trained task head's parameters (0: none)
    train: int  # the clients' pool (partitioned)
    validation: int
    test: int
    server: int  # the server-held split (the LoRA-SB init's gradient with init.source=server)
    label_names: list[str]
    partition_sizes: list[int]
    cohort: int  # clients per round
    counts: comm.CommCounts  # the closed form, for one client and for the cohort
    privacy: list[ClientPrivacy] | None  # None: DP off


def check_output_dir(output_dir: str | Path) -> None:
    """The run directory can be created under `output_dir`: checked by creating the missing directories
    and a file in them, as the run will (permission bits do not tell: root ignores them, and a
    read-only or virtual file system refuses whatever they say), then removing what it made."""
    path = Path(output_dir).expanduser().absolute()
    accepted = f"output_dir: got {str(output_dir)!r}; accepted: a directory that can be created and written"
    existing, missing = path, []
    while not existing.exists():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise CheckError(f"{accepted} ({existing} is a file, not a directory)")
    created: list[Path] = []
    try:
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except OSError as err:
                reason = f"{existing} is not writable" if isinstance(err, PermissionError) else \
                    f"cannot create {directory}: {err.strerror}"
                raise CheckError(f"{accepted} ({reason})") from err
            created.append(directory)
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".fedsb-check-"):
                pass
        except OSError as err:
            raise CheckError(f"{accepted} ({path} is not writable: {err.strerror})") from err
    finally:
        for directory in reversed(created):
            directory.rmdir()


def _data_error(config: ExperimentConfig, err: DataError) -> CheckError:
    """A data error, prefixed with the config key it is about (a missing column: that column's key)."""
    d = config.data
    key = "data"
    if isinstance(err, MissingColumnError):
        columns = {d.text_column: "data.text_column", d.label_column: "data.label_column"}
        if d.text_pair_column:
            columns[d.text_pair_column] = "data.text_pair_column"
        if config.model.task == "causal_lm":
            columns.update({d.prompt_column: "data.prompt_column", d.response_column: "data.response_column"})
            if d.input_column:
                columns[d.input_column] = "data.input_column"
        key = columns.get(err.column, key)
    if isinstance(err, UnknownLabelsError):
        files = {str(Path(f).expanduser()): k for k, f in (("data.test_file", d.test_file),
                                                           ("data.val_file", d.val_file)) if f}
        key = files.get(str(Path(err.where).expanduser()), key)
    return CheckError(f"{key}: {' '.join(str(err).split())}")


def _model_error(name: str, err: Exception) -> CheckError:
    cause = short(" ".join(f"{type(err).__name__}: {err}".split()), 120)
    return CheckError(f"model.name: got {name!r}; accepted: {DEFAULT_MODEL!r} (the packaged MiniLM), "
                      f"{', '.join(TINY_MODELS)}, a local model directory or a hub id ({cause})")


def build_architecture(config: ExperimentConfig, num_labels: int) -> PreTrainedModel:
    """The base model as the Worker would load it, on the meta device (shapes, no weights), after
    reading its config and tokenizer; a model that cannot be found is a CheckError naming model.name."""
    m = config.model
    try:
        if m.name in TINY_MODELS:
            arch = tiny_config(m.name, m.task, num_labels)
        else:
            source = resolve_model_source(m.name)
            arch = AutoConfig.from_pretrained(source)
            if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in WEIGHT_FILES):
                raise FileNotFoundError(f"{source} has no weights ({', '.join(WEIGHT_FILES)})")
            if m.task == "classification":
                arch.num_labels = num_labels
            elif arch.model_type in ENCODERS:
                arch.is_decoder = True  # as load_model does for an encoder used as a causal LM
        load_tokenizer(m.name)
    except (OSError, ValueError, KeyError) as err:
        raise _model_error(m.name, err) from err
    with torch.device("meta"):
        return model_from_config(arch, m.task)


def _targets(config: ExperimentConfig, model: PreTrainedModel) -> list[str]:
    """The target module names; each configured pattern must match at least one linear layer."""
    patterns = config.model.target_modules
    try:
        names = find_target_modules(model, None if patterns is None else tuple(patterns))
    except ValueError as err:
        raise CheckError(f"model.target_modules: got {patterns!r}; accepted: module name patterns "
                         f"({' '.join(str(err).split())})") from err
    for pattern in patterns or []:
        try:
            find_target_modules(model, (pattern,))
        except ValueError as err:
            examples = sorted({n.rsplit(".", 1)[-1] for n in find_target_modules(model, ("*",))})
            raise CheckError(f"model.target_modules: pattern {pattern!r} matches no linear layer of "
                             f"{config.model.name}; accepted: patterns such as "
                             f"{', '.join(examples[:8])}") from err
    return names


def _check_rank(config: ExperimentConfig, model: PreTrainedModel, targets: list[str]
                ) -> list[tuple[int, int]]:
    """(out, in) of each target; the rank may not exceed any target's smaller dimension (LoRA-GA's:
    half of it, for the gradient's top 2r singular vectors)."""
    shapes = [weight_shape(model.get_submodule(name)) for name in targets]
    smallest = min(range(len(targets)), key=lambda i: min(shapes[i]))
    init = get_method(config.method.name).init_for(config.method.init.name)
    bound = min(shapes[smallest]) // init.dims_per_rank
    if config.method.rank > bound:
        out_f, in_f = shapes[smallest]
        needs = "" if init.dims_per_rank == 1 else f" / {init.dims_per_rank} (the {init.name} init uses " \
            f"{init.dims_per_rank}r singular vectors)"
        raise CheckError(f"method.rank: got {config.method.rank}; accepted: an integer in 1..{bound}, the "
                         f"smaller dimension of target module {targets[smallest]} ({out_f} x {in_f}){needs}")
    return shapes


def _privacy(config: ExperimentConfig, sizes: list[int]) -> list[ClientPrivacy] | None:
    """Each client's calibrated ledger (clients of equal size share one calibration)."""
    if not config.privacy.enabled:
        return None
    from fedsb.experiment.privacy import ledger_for_client  # opacus: only when DP is on

    smallest = min(sizes)
    delta = config.privacy.delta
    if delta is not None and delta >= 1.0 / smallest:
        client = sizes.index(smallest)
        raise CheckError(f"privacy.delta: got {delta!r}; accepted: a number in (0, 1/n) = "
                         f"(0, {1.0 / smallest:.3g}) for the smallest client (client {client}, "
                         f"n={smallest} examples), or null")
    ledgers = {}
    out = []
    for client, n in enumerate(sizes):
        if n not in ledgers:
            try:
                ledgers[n] = ledger_for_client(config, n)
            except ValueError as err:
                raise CheckError(f"privacy: client {client} (n={n}): {' '.join(str(err).split())}") from err
        ledger = ledgers[n]
        out.append(ClientPrivacy(client, n, ledger.delta, ledger.noise_multiplier))
    return out


def check_plan(config: ExperimentConfig) -> Plan:
    """Check every input of a validated config as the run will use it, and return the plan.

    Nothing is written and no Flower process starts; raises CheckError (one line) on the first
    input that the run could not use.
    """
    check_output_dir(config.output_dir)
    bars = is_progress_bar_enabled()
    disable_progress_bar()  # no "Flattening the indices" bars in a check
    try:
        return _check_plan(config)
    finally:
        if bars:
            enable_progress_bar()


def _check_plan(config: ExperimentConfig) -> Plan:
    # The data, as the Worker loads it (fedsb.experiment.task.load_task_data), one step at a time.
    try:
        pool, test, validation, server, names = load_splits(config)
    except DataError as err:
        raise _data_error(config, err) from err
    except OSError as err:  # a file that exists but cannot be opened
        raise CheckError(f"data: cannot read the data: {' '.join(str(err).split())}") from err
    k = config.federation.num_clients
    if len(pool) < MIN_EXAMPLES_PER_CLIENT * k:
        raise CheckError(
            f"federation.num_clients: got {k}; accepted: at most {len(pool) // MIN_EXAMPLES_PER_CLIENT} "
            f"(at least {MIN_EXAMPLES_PER_CLIENT} training examples per client: the pool has {len(pool)} "
            f"after the validation ({len(validation)}), test ({len(test)}) and server ({len(server)}) "
            "splits; or use more data)")
    p = config.partition
    try:
        partitions = partition_dataset(pool, k, p.scheme, alpha=p.alpha,
                                       classes_per_client=p.classes_per_client, seed=config.seed)
    except DataError as err:
        raise CheckError(f"partition.scheme: {' '.join(str(err).split())}") from err
    sizes = [len(part) for part in partitions]
    model = build_architecture(config, len(names))
    targets = _targets(config, model)
    shapes = _check_rank(config, model, targets)
    method = get_method(config.method.name)
    problem = method.shape_problem(target_specs(model, targets), config.method.rank)
    if problem:  # e.g. Bone's block size must divide every target's dimensions
        raise CheckError(f"method.rank: got {config.method.rank}; accepted: {problem}")
    init_gradients = (method.needs_init_gradients(config.method.init.name)
                      and config.method.init.source == "clients")
    cohort = config.clients_per_round()
    counts = comm.count(model, config.method.name, config.method.rank, config.model.target_modules,
                        num_clients=cohort, init_gradients=init_gradients, init=config.method.init.name)
    privacy = _privacy(config, sizes)
    device = resolve_device(config.model.device)
    head = comm.head_shapes(model)
    return Plan(
        config=config, model_type=str(model.config.model_type), device=str(device),
        dtype=str(resolve_dtype(config.model.dtype, device)).removeprefix("torch."),
        targets=targets, target_shapes=shapes,
        head_params=sum(int(torch.Size(s).numel()) for s in head.values()),
        train=len(pool), validation=len(validation), test=len(test), server=len(server), label_names=names,
        partition_sizes=sizes, cohort=cohort, counts=counts, privacy=privacy)


def _names(values: list[str], shown: int, width: int = 80) -> str:
    listed = ", ".join(short(v, width) for v in values[:shown])
    return listed + (f", ... ({len(values) - shown} more)" if len(values) > shown else "")


def format_plan(plan: Plan) -> str:
    """The plan as `fedsb run CONFIG --check` prints it."""
    c = plan.config
    m, d, f = c.model, c.data, c.federation
    counts = plan.counts
    shapes = sorted(set(plan.target_shapes))
    lines = [
        f"model: {m.name} ({plan.model_type}), task {m.task}, max_length {m.max_length}, "
        f"device {plan.device}, dtype {plan.dtype}",
        f"targets: {len(plan.targets)} modules ({', '.join(f'{o}x{i}' for o, i in shapes)}): "
        f"{_names(plan.targets, SHOWN_TARGETS)}; trained head: "
        + (f"{plan.head_params:,} params" if plan.head_params else "none"),
        f"data: {d.source}: train pool {plan.train:,}, validation {plan.validation:,}, test {plan.test:,}, "
        f"server split {plan.server:,}",
        f"labels ({len(plan.label_names)}): {_names(plan.label_names, 10, 24)}",
        f"partition: {c.partition.scheme}, {f.num_clients} clients: "
        f"{', '.join(map(str, plan.partition_sizes))} examples (sum {sum(plan.partition_sizes):,})",
        f"method: {c.method.name}, init {counts.init}, rank {c.method.rank}, alpha {c.lora_alpha:g}; "
        f"{f.rounds} rounds, "
        f"{plan.cohort} client(s) per round, {c.train.local_steps} local steps of batch {c.train.batch_size}",
        f"bytes per round, per client: up {counts.bytes('up'):,} B, down {counts.bytes('down'):,} B "
        f"(a client's first round adds {counts.init_bytes('down'):,} B down, "
        f"{counts.init_bytes('up'):,} B up); all {plan.cohort}: "
        f"up {counts.bytes('up', all_clients=True):,} B, down {counts.bytes('down', all_clients=True):,} B",
    ]
    if plan.privacy is None:
        lines.append("privacy: off")
    else:
        from fedsb.experiment.privacy import max_local_steps

        pv = c.privacy
        lines.append(f"privacy: epsilon {pv.epsilon:g} per client over {max_local_steps(c)} DP-SGD steps, "
                     f"clip {pv.max_grad_norm:g}, {pv.accountant} accountant; per client:")
        lines += [f"  client {p.client}: n={p.num_examples}, delta {p.delta:.3g}, noise multiplier "
                  f"{p.noise_multiplier:.4g}" for p in plan.privacy]
    lines.append(f"output: a new run directory under {Path(c.output_dir).expanduser().absolute()}")
    return "\n".join(lines)
