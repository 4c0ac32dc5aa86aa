"""`fedsb sweep SWEEP.yaml`: a grid of real simulations on top of one base config.

A sweep file (its first line is a comment with the command that runs it):

    # Run: fedsb sweep configs/sweeps/comm.yaml
    base: ../default.yaml            # the base config, relative to this file (or absolute)
    output_dir: runs/sweeps/comm     # the sweep directory, relative to where you run the command
    set:                             # optional: overrides every cell shares
      federation.rounds: 3
    grid:                            # the cartesian product of these axes is the set of cells
      method.name: [fedit, ffa, fedex, fedsb]
      method.rank: [4, 16]
      privacy:                       # a linked axis: each value is a mapping of overrides that go
        - {privacy.enabled: false}   # together (here "no DP" next to three budgets); its name
        - {privacy.enabled: true, privacy.epsilon: 1}   # is free text
        - {privacy.enabled: true, privacy.epsilon: 3}

Every cell is one real run through `fedsb.ops.launch.run_simulation` (the path of `fedsb run`), with
its runs under <sweep dir>/runs. As soon as a cell ends, one row is appended to
<sweep dir>/sweep.csv: the grid values, status and error, accuracy, bytes (total and by
component), privacy spent, wall time and the run directory. Running the sweep again skips the
cells whose latest row is completed and retries the others; a failed cell (a bad value stops at
config validation; a Flower run can fail) is recorded and the sweep goes on.

The settings every cell shares (the base config's content and `set`) are pinned in
<sweep dir>/sweep.json on the first run: a second run with other shared settings stops rather
than mix results of two different experiments in one sweep.csv. The grid may grow.

A list in a linked value expands into one value per element (several lists: their product), for
a key whose config type is not itself a list (`model.target_modules: [query, value]` stays one
value). This gives each method its own grid of another key, e.g. its own learning rates:

    grid:
      method:                                                  # 3 + 2 values
        - {method.name: fedsb, method.rank: 64, train.lr: [0.003, 0.01, 0.03]}
        - {method.name: ffa, method.rank: 16, train.lr: [0.0003, 0.001]}
      seed: [0, 1, 2]                                          # the repetitions
    tune: train.lr

(Numbers are read as YAML 1.2 and Python read them: 1e-3, 5E-4, .5 and 1_000 are numbers.)

Tuning. With `tune: <config key>` (a key some grid axis sets, typically train.lr), the cells are
grouped by their grid values less the tuned key and `seed`; in each group the value of the tuned
key with the highest mean `best_val_accuracy` over its completed seeds is chosen (ties: the first
in grid order). Selection reads the validation split only; the test accuracy at the chosen value
(mean and sample std over seeds) is what is reported. At the end of the sweep,
<sweep dir>/tuned.csv has one row per group (TUNED_FIELDS, with the group's grid values after
`group`) and a short table is printed; `fedsb plot` reads the same selection (tune_results).
A run with `federation.centralised: true` (every client's data pooled in one client) is a
reference, not a federated result, and is labelled so (setting_label).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import statistics
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from fedsb.experiment.config import ConfigError, ExperimentConfig, load_config, load_yaml

COMPLETED = "finished:completed"  # fedsb.ops.launch.COMPLETED (not imported here: launch loads torch)
INVALID_CONFIG = "invalid config"  # the cell's config did not validate: nothing was started
ERROR = "error"  # run_simulation raised (e.g. the SuperLink did not start)
TOP_LEVEL_KEYS = ("base", "output_dir", "set", "grid", "tune")
RESERVED_KEYS = ("output_dir",)  # the sweep sets each cell's output_dir itself
# Same order as fedsb.experiment.comm.METER_COMPONENTS (importing fedsb.experiment.comm would load torch).
COMPONENTS = ("lora_A", "lora_B", "lora_R", "residual", "head", "init")
DIRECTIONS = ("up", "down")
RESULT_FIELDS = (
    "status", "error", "method", "rank", "lr", "seed",
    "centralised",  # all clients' data pooled in one client: a reference, not a federated result
    "privacy_requested", "private", "privacy_status", "epsilon_target", "epsilon_max", "delta",
    "noise_multiplier", "oracle",  # oracle: Fed-SB's pooled-data init (the paper's setting), not federated
    # Validation selects the round (best_round); test_accuracy is the test split at that round, the
    # number to report; final_test_accuracy the test split after the last round.
    "initial_val_accuracy", "final_val_accuracy", "best_val_accuracy", "best_round",
    "test_accuracy", "final_test_accuracy", "rounds", "rounds_completed",
    "bytes_up", "bytes_down", "bytes_total", "wire_bytes_up", "wire_bytes_down",
    *(f"bytes_{d}_{c}" for d in DIRECTIONS for c in COMPONENTS),
    "wall_s", "elapsed_s", "run_dir", "finished_at",
)


class SweepError(ValueError):
    """A bad sweep file or sweep directory: the message is one line naming the key."""


# --- the sweep file -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Axis:
    """One grid axis. A plain axis sets one config key; a linked axis sets a few keys together."""

    name: str
    values: tuple[dict[str, Any], ...]  # each value as the overrides it applies

    @property
    def keys(self) -> list[str]:
        return _unique(k for value in self.values for k in value)


@dataclass(frozen=True)
class Cell:
    index: int  # 1-based position in the grid
    overrides: dict[str, Any]  # the grid's overrides only (dotted keys)

    @property
    def label(self) -> str:
        """'method.name=fedsb privacy.epsilon=1': also valid `fedsb run --set` arguments."""
        return _describe(self.overrides)


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    base: Path
    output_dir: Path  # absolute
    fixed: dict[str, Any]  # `set`
    axes: tuple[Axis, ...]
    tune: str | None = None  # the config key chosen per group on validation accuracy
    tune_seeds: tuple[int, ...] | None = None  # choose on these seeds' validation only (None: every seed)

    @property
    def columns(self) -> list[str]:
        """The config keys the grid varies: sweep.csv's grid columns."""
        return _unique(k for axis in self.axes for k in axis.keys)

    @property
    def shape(self) -> str:
        return " x ".join(str(len(axis.values)) for axis in self.axes)

    def cells(self) -> list[Cell]:
        return [Cell(i, overrides)
                for i, overrides in enumerate(grid_overrides([axis.values for axis in self.axes]), start=1)]

    def pin(self) -> dict[str, Any]:
        """What every cell shares: a sweep directory holds the results of one such setting."""
        return {"base": str(self.base), "base_sha256": hashlib.sha256(self.base.read_bytes()).hexdigest(),
                "set": self.fixed}


def grid_overrides(axes: Iterable[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The cells' overrides in grid order: the product of the axes' values (each a mapping)."""
    return [{k: v for value in combo for k, v in value.items()} for combo in itertools.product(*axes)]


def grid_labels(grid: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """The cell labels in grid order, from sweep.json's `grid` record (axis name -> its values)."""
    return [_describe(overrides) for overrides in grid_overrides(grid.values())]


def format_value(value: Any) -> str:
    """A value as YAML would read it back (what `--set key=value` parses): 1, true, fedsb, "1"."""
    if isinstance(value, str):
        try:
            same = load_yaml(value) == value
        except yaml.YAMLError:
            same = False
        return value if same and value.strip() == value and value else json.dumps(value)
    return json.dumps(value)


def parse_value(text: str) -> Any:
    """The inverse of format_value ('' is a missing value)."""
    return load_yaml(text) if text != "" else None


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def check_config_key(dotted: str, where: str) -> Any:
    """The type of a config value; SweepError unless `dotted` names a value (not a section)."""
    cls: Any = ExperimentConfig
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            section = ".".join(parts[:depth]) or "the config"
            raise SweepError(f"{where}: unknown config key {dotted!r} ({part!r} is not in {section}; "
                             f"accepted: {', '.join(sorted(hints))})")
        cls = hints[part]
        if not dataclasses.is_dataclass(cls):
            if depth != len(parts) - 1:
                raise SweepError(f"{where}: unknown config key {dotted!r} "
                                 f"({part!r} is a value, not a section)")
            return cls
    raise SweepError(f"{where}: {dotted!r} is a section, not a value; name a key inside it, "
                     f"e.g. {dotted}.{sorted(typing.get_type_hints(cls))[0]}")


def _is_list_type(hint: Any) -> bool:
    """list[str], list[str] | None, ...: a config value that is itself a list."""
    origin = typing.get_origin(hint)
    if hint is list or origin is list:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_list_type(arg) for arg in typing.get_args(hint))
    return False


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'federation': {'rounds': 3}} -> {'federation.rounds': 3}; dotted keys stay as they are."""
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _check_overrides(overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for k, v in overrides.items():
        if not isinstance(k, str) or not k:
            raise SweepError(f"{where}: keys must be dotted config keys such as method.rank, got {k!r}")
        if k in RESERVED_KEYS:
            raise SweepError(f"{where}.{k}: the sweep sets each cell's {k} (<sweep dir>/runs); remove it")
        check_config_key(k, f"{where}.{k}")
        out[k] = v
    return out


def _parse_axis(name: Any, values: Any) -> Axis:
    where = f"grid.{name}"
    if not isinstance(name, str) or not name:
        raise SweepError(f"grid: axis names must be strings, got {name!r}")
    if not isinstance(values, list) or not values:
        raise SweepError(f"{where}: expected a non-empty list of values, got {values!r}")
    linked = [isinstance(v, Mapping) for v in values]
    if any(linked) and not all(linked):
        raise SweepError(f"{where}: mixes mappings and plain values; a linked axis lists mappings of "
                         "overrides only, e.g. [{privacy.enabled: false}, {privacy.enabled: true}]")
    if all(linked):
        parsed = []
        for i, value in enumerate(values):
            if not value:
                raise SweepError(f"{where}[{i}]: an empty mapping; list the overrides this value applies")
            parsed += _expand_lists(_check_overrides(_flatten(value), f"{where}[{i}]"), f"{where}[{i}]")
    else:
        if name in RESERVED_KEYS:
            raise SweepError(f"{where}: the sweep sets each cell's {name} (<sweep dir>/runs); remove it")
        check_config_key(name, where)
        parsed = [{name: v} for v in values]
    seen: list[dict[str, Any]] = []
    for value in parsed:
        if value in seen:
            raise SweepError(f"{where}: value {_describe(value)} is listed twice")
        seen.append(value)
    return Axis(name, tuple(parsed))


def _expand_lists(overrides: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """{rank: 64, train.lr: [0.003, 0.01]} -> one value per lr (a product if several keys are lists);
    a list for a key whose config type is a list (model.target_modules) is one value."""
    choices = []
    for k, v in overrides.items():
        if isinstance(v, list) and not _is_list_type(check_config_key(k, f"{where}.{k}")):
            if not v:
                raise SweepError(f"{where}.{k}: an empty list; list the values it expands into")
            choices.append(v)
        else:
            choices.append([v])
    return [dict(zip(overrides, combo, strict=True)) for combo in itertools.product(*choices)]


def _describe(overrides: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={format_value(v)}" for k, v in overrides.items())


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; every error is one line naming the key."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep: file {path} does not exist")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"sweep: {path} is not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise SweepError(f"sweep: {path} must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    for k in data:
        if k not in TOP_LEVEL_KEYS:
            raise SweepError(f"{k}: unknown key; accepted keys: {', '.join(TOP_LEVEL_KEYS)}")
    for k in ("base", "output_dir", "grid"):
        if k not in data:
            raise SweepError(f"{k}: missing; a sweep file needs base, output_dir and grid")
    for k in ("base", "output_dir"):
        if not isinstance(data[k], str) or not data[k].strip():
            raise SweepError(f"{k}: expected a path, got {data[k]!r}")
    base = Path(data["base"]).expanduser()
    base = (base if base.is_absolute() else path.parent / base).resolve()
    if not base.is_file():
        raise SweepError(f"base: file {base} does not exist (a relative base is taken from the sweep "
                         "file's directory)")
    fixed = data.get("set") or {}
    if not isinstance(fixed, Mapping):
        raise SweepError(f"set: expected a mapping of config keys to values, got {fixed!r}")
    fixed = _check_overrides(_flatten(fixed), "set")
    grid = data["grid"]
    if not isinstance(grid, Mapping) or not grid:
        raise SweepError(f"grid: expected a non-empty mapping of axes, got {grid!r}")
    axes = tuple(_parse_axis(name, values) for name, values in grid.items())
    owner: dict[str, str] = {}
    for axis in axes:
        for k in axis.keys:
            if k in owner:
                raise SweepError(f"grid.{axis.name}: {k} is also set by grid.{owner[k]}")
            if k in fixed:
                raise SweepError(f"set.{k}: also set by grid.{axis.name}; keep it in one place")
            owner[k] = axis.name
    output_dir = Path(data["output_dir"]).expanduser().resolve()
    tune, tune_seeds = data.get("tune"), None
    if isinstance(tune, Mapping):  # {key: train.lr, seeds: [0]}: choose on those seeds' validation only
        unknown = set(tune) - {"key", "seeds"}
        if unknown:
            raise SweepError(f"tune.{sorted(unknown)[0]}: unknown key; accepted keys: key, seeds")
        seeds = tune.get("seeds")
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise SweepError(f"tune.seeds: expected a non-empty list of seeds, got {seeds!r}")
        tune, tune_seeds = tune.get("key"), tuple(seeds)
    return SweepSpec(path, base, output_dir, fixed, axes, _check_tune(tune, list(owner)), tune_seeds)


def _check_tune(tune: Any, grid_keys: Sequence[str]) -> str | None:
    if tune is None:
        return None
    if not isinstance(tune, str) or not tune:
        raise SweepError(f"tune: expected a config key to choose on validation, e.g. train.lr, got {tune!r}")
    if tune == "seed":
        raise SweepError("tune: seed is the repetition the tuning averages over; name another grid key, "
                         "e.g. train.lr")
    if tune not in grid_keys:
        raise SweepError(f"tune: {tune} is not set by any grid axis (grid keys: {', '.join(grid_keys)}); "
                         f"give it values in the grid, e.g. {tune}: [...]")
    return tune


# --- sweep.csv ------------------------------------------------------------------------------------

def csv_header(columns: Sequence[str]) -> list[str]:
    # A grid over `seed` shares its column with the result field `seed` (the same value).
    return _unique(["cell", *columns, *RESULT_FIELDS])


def read_rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """sweep.csv as (header, rows of strings); ([], []) if there is none."""
    if not csv_path.is_file():
        return [], []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def grid_columns(header: Sequence[str]) -> list[str]:
    """The grid columns of a sweep.csv header: those between 'cell' and 'status'."""
    return list(header[1:header.index("status")]) if "status" in header else []


def latest_rows(rows: Iterable[dict[str, str]]) -> dict[str, dict[str, str]]:
    """cell label -> its latest row (a retried cell has several)."""
    latest: dict[str, dict[str, str]] = {}
    for row in rows:
        latest[row["cell"]] = row
    return latest


def _append_row(csv_path: Path, columns: Sequence[str], row: Mapping[str, Any]) -> None:
    old_header, old_rows = read_rows(csv_path)
    header = csv_header(_unique([*grid_columns(old_header), *columns]))
    header += [k for k in old_header if k not in header]  # a field of an older schema keeps its values
    if old_header != header:
        # A new file, or the grid grew a key: (re)write it with the wider header (old rows blank there).
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, header, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(old_rows)
    with open(csv_path, "a", newline="") as f:
        csv.DictWriter(f, header, restval="", extrasaction="ignore").writerow(row)


# --- one cell's row ---------------------------------------------------------------------------------

def _scalar(value: Any) -> Any:
    """A number from a number, or the largest of a per-client list/mapping (None: unknown)."""
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list):
        numbers = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return max(numbers) if numbers else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_metrics(run_dir: Path) -> dict[str, Any]:
    try:
        lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, json.JSONDecodeError):
        return {}


def result_fields(run_dir: Path) -> dict[str, Any]:
    """The sweep.csv fields read from a run directory (empty where the run left nothing)."""
    summary = _read_json(run_dir / "summary.json")
    out: dict[str, Any] = {k: summary.get(k) for k in (
        "initial_val_accuracy", "final_val_accuracy", "best_val_accuracy", "best_round", "test_accuracy",
        "final_test_accuracy", "rounds", "rounds_completed", "oracle", "wall_s")}
    comm = summary.get("communication") or {}
    for d in DIRECTIONS:
        part = comm.get(d) or {}
        out[f"bytes_{d}"] = part.get("bytes")
        out[f"wire_bytes_{d}"] = part.get("wire_bytes")
        by_component = part.get("bytes_by_component") or {}
        for c in COMPONENTS:
            out[f"bytes_{d}_{c}"] = by_component.get(c, 0) if part else None
    if out["bytes_up"] is not None and out["bytes_down"] is not None:
        out["bytes_total"] = out["bytes_up"] + out["bytes_down"]
    if summary:
        out.update(privacy_fields(summary.get("privacy"), _last_metrics(run_dir)))
    return out


def privacy_fields(privacy: Mapping[str, Any] | None, last_round: Mapping[str, Any]) -> dict[str, Any]:
    """`private`, `privacy_status` and what was spent, from summary.json's `privacy` object.

    A run without a `privacy` object was not private, whatever its config asked for; nor was one
    whose status says "not private" (DP-SGD ran, but e.g. the Fed-SB init pooled raw data).
    """
    if not privacy:
        return {"private": False, "privacy_status": "not reported"}
    enabled = bool(privacy.get("enabled", False))
    status = str(privacy.get("status") or ("private" if enabled else "off"))
    out: dict[str, Any] = {"private": enabled and status == "private", "privacy_status": status}
    if enabled:
        epsilon = privacy.get("epsilon_max")
        if epsilon is None:
            epsilon = last_round.get("epsilon_max_all", last_round.get("epsilon_max"))
        out["epsilon_max"] = _scalar(epsilon)
        # Per-client values (a list, a mapping or a [min, max] range): the largest is reported.
        out["delta"] = _scalar(privacy.get("delta", privacy.get("delta_max")))
        noise = privacy.get("noise_multiplier", privacy.get("noise_multiplier_range"))
        out["noise_multiplier"] = _scalar(noise)
    return out


def _config_fields(config: ExperimentConfig | None) -> dict[str, Any]:
    if config is None:
        return {}
    return {"method": config.method.name, "rank": config.method.rank, "lr": config.train.lr,
            "seed": config.seed, "centralised": bool(getattr(config.federation, "centralised", False)),
            "privacy_requested": config.privacy.enabled,
            "epsilon_target": config.privacy.epsilon if config.privacy.enabled else None}


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e15 else repr(value)
    return value


# --- tuning: one value of a key per group, chosen on validation -----------------------------------

# The centralised reference trains what the method's client trains, on all clients' data in one client.
CENTRALISED_NAMES = {"fedit": "LoRA", "fedex": "LoRA", "ffa": "LoRA (A frozen)", "fedsb": "LoRA-SB"}
LABELLED_KEYS = ("method.name", "method.rank", "federation.centralised")  # said by setting_label itself
TUNED_FIELDS = (
    "group", "method", "rank", "centralised", "tune_key", "tune_value", "seeds", "seeds_failed",
    "val_accuracy_mean", "test_accuracy_mean", "test_accuracy_std", "final_test_accuracy_mean",
    "final_test_accuracy_std", "bytes_up_mean", "bytes_down_mean", "bytes_total_mean", "elapsed_s_mean",
    "candidates",
)


def setting_label(method: str, rank: Any, centralised: bool = False, extras: Sequence[str] = ()) -> str:
    """'fedsb r=16 privacy.epsilon=1'; a centralised run is named by what it trains and marked as
    the reference it is: 'LoRA r=8, centralised (not federated)'."""
    if centralised:
        name = CENTRALISED_NAMES.get(method, method)
        return " ".join([f"{name} r={rank}", *extras]) + ", centralised (not federated)"
    return " ".join([f"{method} r={rank}", *extras])


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof=1) over seeds; None where undefined."""

    mean: float | None = None
    std: float | None = None  # None with fewer than two values

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(statistics.mean(values) if values else None,
                   statistics.stdev(values) if len(values) > 1 else None)


@dataclass(frozen=True)
class TuneCandidate:
    """One value of the tuned key in a group: what selects it (validation) and, for the record, its test."""

    value: str  # as sweep.csv writes it (format_value)
    seeds: int  # completed cells
    failed: int  # cells that did not complete (or not yet run)
    val_mean: float | None  # mean best_val_accuracy over the completed seeds: the selection criterion
    test_mean: float | None  # mean test_accuracy: shown, never used to select


@dataclass(frozen=True)
class TunedGroup:
    """A group of cells (the grid values less the tuned key and the seed) at its chosen value."""

    label: str
    grid: dict[str, str]  # the group's grid values (sweep.csv text), less the tuned key and the seed
    method: str
    rank: int | None
    centralised: bool
    tune_key: str
    candidates: tuple[TuneCandidate, ...]  # every value of the tuned key, in grid order
    chosen: TuneCandidate | None  # None: no cell of the group completed
    cells: tuple[str, ...] = ()  # the completed cells at the chosen value (one per seed)
    val_accuracy: Stat = Stat()  # best_val_accuracy over the chosen cells
    test_accuracy: Stat = Stat()  # the test split at each run's best validation round: the result
    final_test_accuracy: Stat = Stat()  # the test split after the last round
    bytes_up: Stat = Stat()
    bytes_down: Stat = Stat()
    bytes_total: Stat = Stat()
    elapsed_s: Stat = Stat()
    select_seeds: tuple[int, ...] | None = None  # the seeds whose validation chose (None: every seed)

    @property
    def seeds(self) -> int:
        return self.chosen.seeds if self.chosen else 0


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str:
    """A grid value as sweep.csv writes it (rows as read are text already)."""
    return "" if value is None else value if isinstance(value, str) else format_value(value)


def _values(rows: Iterable[Mapping[str, Any]], name: str) -> list[float]:
    return [v for v in (_number(r.get(name)) for r in rows) if v is not None]


def tune_results(rows: Iterable[Mapping[str, Any]], columns: Sequence[str],
                 tune_key: str, select_seeds: Sequence[int] | None = None) -> list[TunedGroup]:
    """Per group of cells (grid `columns` less `tune_key` and `seed`), the value of `tune_key` whose
    completed seeds have the highest mean best_val_accuracy (ties: the first in the order of `rows`),
    and the test results there over all its completed seeds. Only validation selects: test_accuracy
    is never compared. With `select_seeds`, only those seeds' validation selects (successive
    halving: every value runs on those seeds, the chosen one on the others too).

    `rows` are sweep.csv rows (the latest row of a cell counts), in grid order (see in_grid_order).
    """
    group_columns = [c for c in columns if c not in (tune_key, "seed")]
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for row in latest_rows(rows).values():
        groups.setdefault(tuple(_text(row.get(c)) for c in group_columns), []).append(row)
    varied = [c for i, c in enumerate(group_columns)
              if c not in LABELLED_KEYS and len({key[i] for key in groups}) > 1]
    return [_tune_group(dict(zip(group_columns, key, strict=True)), members, varied, tune_key, select_seeds)
            for key, members in groups.items()]


def _tune_group(grid: dict[str, str], rows: list[Mapping[str, Any]], varied: Sequence[str],
                tune_key: str, select_seeds: Sequence[int] | None = None) -> TunedGroup:
    selecting = {str(s) for s in select_seeds} if select_seeds else None
    by_value: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_value.setdefault(_text(row.get(tune_key)), []).append(row)
    candidates, done_at = [], {}
    for value, members in by_value.items():
        done = [r for r in members if r.get("status") == COMPLETED]
        done_at[value] = done
        selects = [r for r in done if selecting is None or _text(r.get("seed")) in selecting]
        candidates.append(TuneCandidate(value, len(done), len(members) - len(done),
                                        Stat.of(_values(selects, "best_val_accuracy")).mean,
                                        Stat.of(_values(done, "test_accuracy")).mean))
    chosen = None
    for candidate in candidates:  # strictly greater: a tie keeps the earlier value
        if candidate.val_mean is not None and (chosen is None or candidate.val_mean > chosen.val_mean):
            chosen = candidate
    first = next((r for r in rows if r.get("method")), rows[0])
    method = str(first.get("method") or grid.get("method.name") or "?")
    rank = _number(first.get("rank") or grid.get("method.rank"))
    centralised = _text(first.get("centralised") or grid.get("federation.centralised")) == "true"
    extras = [f"{c}={grid[c]}" for c in varied]
    if _text(first.get("oracle")) == "true":
        extras.append("(oracle init)")
    label = setting_label(method, int(rank) if rank is not None else "?", centralised, extras)
    common = dict(label=label, grid=grid, method=method, rank=int(rank) if rank is not None else None,
                  centralised=centralised, tune_key=tune_key, candidates=tuple(candidates), chosen=chosen,
                  select_seeds=tuple(select_seeds) if select_seeds else None)
    if chosen is None:
        return TunedGroup(**common)
    done = done_at[chosen.value]
    totals = [u + d for u, d in zip(_values(done, "bytes_up"), _values(done, "bytes_down"), strict=False)]
    return TunedGroup(**common, cells=tuple(str(r.get("cell")) for r in done),
                      val_accuracy=Stat.of(_values(done, "best_val_accuracy")),
                      test_accuracy=Stat.of(_values(done, "test_accuracy")),
                      final_test_accuracy=Stat.of(_values(done, "final_test_accuracy")),
                      bytes_up=Stat.of(_values(done, "bytes_up")),
                      bytes_down=Stat.of(_values(done, "bytes_down")),
                      bytes_total=Stat.of(_values(done, "bytes_total") or totals),
                      elapsed_s=Stat.of(_values(done, "elapsed_s")))


def in_grid_order(rows: Iterable[Mapping[str, Any]], labels: Sequence[str]) -> list[Mapping[str, Any]]:
    """The latest row of each cell named in `labels`, in that order (cells of an older grid left out)."""
    latest = latest_rows(rows)
    return [latest[label] for label in labels if label in latest]


def tuned_row(group: TunedGroup) -> dict[str, Any]:
    """A tuned.csv row (TUNED_FIELDS, the group's grid values after `group`)."""
    chosen = group.chosen
    candidates = "; ".join(
        f"{c.value}: val {_csv_value(c.val_mean) or '-'}, test {_csv_value(c.test_mean) or '-'}, n {c.seeds}"
        for c in group.candidates)
    return {"group": group.label, **group.grid, "method": group.method, "rank": group.rank,
            "centralised": group.centralised, "tune_key": group.tune_key,
            "tune_value": chosen.value if chosen else None, "seeds": group.seeds,
            "seeds_failed": chosen.failed if chosen else None, "val_accuracy_mean": group.val_accuracy.mean,
            "test_accuracy_mean": group.test_accuracy.mean, "test_accuracy_std": group.test_accuracy.std,
            "final_test_accuracy_mean": group.final_test_accuracy.mean,
            "final_test_accuracy_std": group.final_test_accuracy.std, "bytes_up_mean": group.bytes_up.mean,
            "bytes_down_mean": group.bytes_down.mean, "bytes_total_mean": group.bytes_total.mean,
            "elapsed_s_mean": group.elapsed_s.mean, "candidates": candidates}


def write_tuned(path: Path, groups: Sequence[TunedGroup]) -> None:
    grid = _unique(k for g in groups for k in g.grid)
    header = _unique(["group", *grid, *TUNED_FIELDS])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, header, restval="")
        writer.writeheader()
        for group in groups:
            writer.writerow({k: _csv_value(v) for k, v in tuned_row(group).items()})


def mean_std_text(stat: Stat, digits: int = 3) -> str:
    """'0.790 ± 0.012' (a single seed: '0.790'; nothing: '–')."""
    if stat.mean is None:
        return "–"
    return f"{stat.mean:.{digits}f}" + (f" ± {stat.std:.{digits}f}" if stat.std is not None else "")


def human_bytes(n: float | None) -> str:
    """Decimal units, as fedsb.experiment.comm.human_bytes (not imported here: it loads torch)."""
    if n is None or math.isnan(n):
        return "–"
    for factor, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{n:.0f} B"


def tuned_table(groups: Sequence[TunedGroup]) -> list[str]:
    """The tuned results as aligned text lines: a header and a line per group."""
    if not groups:
        return []
    header = ["group", groups[0].tune_key, "seeds", "val acc", "test acc", "final-round test acc",
              "bytes total"]
    rows = [[g.label, g.chosen.value if g.chosen else "–", str(g.seeds), mean_std_text(g.val_accuracy),
             mean_std_text(g.test_accuracy), mean_std_text(g.final_test_accuracy),
             human_bytes(g.bytes_total.mean)] for g in groups]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


# --- running -----------------------------------------------------------------------------------------

class Outcome(Protocol):
    status: str
    details: str
    run_dir: Path
    elapsed_s: float


Runner = Callable[..., Outcome]  # run_simulation's signature


@dataclass
class SweepResult:
    spec: SweepSpec
    csv_path: Path
    ran: list[dict[str, Any]]  # the rows written by this invocation
    skipped: list[Cell]  # completed earlier
    tuned: list[TunedGroup] = dataclasses.field(default_factory=list)  # with `tune`: tuned.csv's groups

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.ran if row["status"] != COMPLETED]


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def progress_line(done: int, total: int, elapsed_s: float, eta_s: float | None, width: int = 24) -> str:
    """'[#########---------------] 3/8 cells | elapsed 2m05s | about 3m20s left'."""
    filled = round(width * done / total) if total else width
    eta = "estimating time left" if eta_s is None else (
        "done" if done >= total else f"about {_duration(eta_s)} left")
    bar = "#" * filled + "-" * (width - filled)
    return f"[{bar}] {done}/{total} cells | elapsed {_duration(elapsed_s)} | {eta}"


def _check_pin(spec: SweepSpec) -> None:
    pin_path = spec.output_dir / "sweep.json"
    pin = spec.pin()
    if pin_path.is_file():
        old = _read_json(pin_path)
        for k in ("base_sha256", "set"):  # the base's content, not its path: a moved clone still resumes
            if old.get(k) != pin[k]:
                what = {"base_sha256": "another or a changed base config", "set": "other `set` overrides"}[k]
                raise SweepError(f"output_dir: {spec.output_dir} holds a sweep run with {what} "
                                 f"(see {pin_path}); choose another output_dir or remove that directory")
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    # Not pinned (a record for `fedsb plot`): the grid may grow, and tuning only reads the results.
    record = {**pin, "sweep_file": str(spec.path.resolve()),
              "grid": {axis.name: list(axis.values) for axis in spec.axes}, "tune": spec.tune,
              "tune_seeds": list(spec.tune_seeds) if spec.tune_seeds else None}
    pin_path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def run_sweep(path: str | Path, *, runner: Runner | None = None, stream: bool = False,
              cpus_per_client: int = 1, app_dir: Path | None = None,
              echo: Callable[[str], None] = print) -> SweepResult:
    """Run every cell not yet completed, appending one sweep.csv row per cell as it ends."""
    spec = load_sweep(path)
    _check_pin(spec)
    if runner is None:
        from fedsb.ops.launch import run_simulation as runner  # loads torch: only when cells run
    csv_path = spec.output_dir / "sweep.csv"
    latest = latest_rows(read_rows(csv_path)[1])
    cells = spec.cells()
    skipped = [c for c in cells if latest.get(c.label, {}).get("status") == COMPLETED]
    todo = [c for c in cells if c not in skipped]
    echo(f"fedsb sweep: {len(cells)} cells ({spec.shape}) on {spec.base} -> {spec.output_dir}; "
         f"{len(skipped)} completed earlier, {len(todo)} to run")
    for cell in skipped:
        accuracy = latest[cell.label].get("test_accuracy") or "?"
        echo(f"[{cell.index}/{len(cells)}] skip {cell.label}: completed earlier (test accuracy {accuracy})")

    start = time.monotonic()
    run_times: list[float] = []  # cells that started a simulation (a config error takes no time)
    ran: list[dict[str, Any]] = []
    for n, cell in enumerate(todo, start=1):
        echo(f"[{cell.index}/{len(cells)}] run  {cell.label}")
        row = run_cell(spec, cell, runner, stream=stream, cpus_per_client=cpus_per_client, app_dir=app_dir,
                       echo=lambda line: echo(f"    {line}"))
        _append_row(csv_path, spec.columns, row)
        ran.append(row)
        if row["run_dir"]:
            run_times.append(float(row["elapsed_s"] or 0.0))
        echo(f"[{cell.index}/{len(cells)}] {_cell_outcome(row)}")
        if row.get("privacy_requested") == "true" and row.get("private") == "false":
            echo(f"    warning: privacy.enabled was set but the run's privacy status is "
                 f"'{row['privacy_status']}': it is recorded and plotted as not private")
        remaining = len(todo) - n
        eta = sum(run_times) / len(run_times) * remaining if run_times else (0.0 if not remaining else None)
        echo(progress_line(len(skipped) + n, len(cells), time.monotonic() - start, eta))

    result = SweepResult(spec, csv_path, ran, skipped)
    done = len(skipped) + len(ran) - len(result.failed)
    echo(f"fedsb sweep: {done}/{len(cells)} cells completed, {len(result.failed)} failed; "
         f"results in {csv_path}; figures: fedsb plot {spec.output_dir}")
    tuned_path = spec.output_dir / "tuned.csv"
    if spec.tune is None:
        tuned_path.unlink(missing_ok=True)  # from an earlier `tune`: it would no longer match the sweep
        return result
    result.tuned = tune_results(in_grid_order(read_rows(csv_path)[1], [c.label for c in cells]),
                                spec.columns, spec.tune, spec.tune_seeds)
    write_tuned(tuned_path, result.tuned)
    over = f"seeds {', '.join(map(str, spec.tune_seeds))}" if spec.tune_seeds else "the completed seeds"
    echo(f"fedsb sweep: {spec.tune} chosen per group on validation accuracy (mean over {over}); "
         f"accuracies are mean ± std over seeds; written to {tuned_path}")
    for line in tuned_table(result.tuned):
        echo(f"    {line}")
    return result


def run_cell(spec: SweepSpec, cell: Cell, runner: Runner, *, stream: bool = False, cpus_per_client: int = 1,
             app_dir: Path | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one cell and return its sweep.csv row; a failure is a row, never an exception."""
    overrides = {**spec.fixed, **cell.overrides, "output_dir": str(spec.output_dir / "runs")}
    row: dict[str, Any] = {"cell": cell.label, **{k: format_value(v) for k, v in cell.overrides.items()},
                           "run_dir": "", "elapsed_s": 0.0, "error": ""}
    try:
        config = load_config(spec.base, overrides)  # a bad value stops here, before anything starts
    except ConfigError as err:
        row.update(status=INVALID_CONFIG, error=str(err))
        return _finish(row)
    row.update(_config_fields(config))
    try:
        outcome = runner(spec.base, overrides, app_dir=app_dir, cpus_per_client=cpus_per_client,
                         stream=stream, echo=echo)
    except Exception as err:  # any failure of one cell is that cell's result: the sweep goes on
        row.update(status=ERROR, error=f"{type(err).__name__}: {err}")
        return _finish(row)
    row.update(status=outcome.status, elapsed_s=round(outcome.elapsed_s, 1),
               error="" if outcome.status == COMPLETED else (outcome.details or outcome.status))
    run_dir = Path(outcome.run_dir)
    # Relative to the sweep directory, so that a moved or copied sweep directory still plots.
    row["run_dir"] = str(run_dir.relative_to(spec.output_dir)) if run_dir.is_relative_to(spec.output_dir) \
        else str(run_dir)
    row.update(result_fields(run_dir))
    return _finish(row)


def _finish(row: dict[str, Any]) -> dict[str, Any]:
    row["error"] = " ".join(str(row.get("error", "")).split())  # one line in the CSV
    row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return {k: _csv_value(v) for k, v in row.items()}


def _cell_outcome(row: Mapping[str, Any]) -> str:
    if row["status"] == COMPLETED:
        def known(name: str) -> str:
            return str(row.get(name) or "?")

        total = row.get("bytes_total")
        return (f"done {row['cell']}: completed in {float(row['elapsed_s']):.0f} s, test accuracy "
                f"{known('test_accuracy')} at round {known('best_round')} (validation "
                f"{known('best_val_accuracy')}; final round: test {known('final_test_accuracy')}), "
                f"{int(total) if total else 0:,} B on the wire")
    return f"FAILED {row['cell']}: {row['status']}: {row['error']}"


# --- the CLI ------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`fedsb sweep` arguments."""
    parser.add_argument("sweep", help="the sweep file, e.g. configs/sweeps/privacy.yaml")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the cells and their status in sweep.csv; run nothing")
    parser.add_argument("--stream", action="store_true",
                        help="stream each run's Flower log (always kept in <run dir>/flower.log)")
    from fedsb.ops.launch import add_launch_arguments

    add_launch_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """`fedsb sweep`: 0 if every cell is completed, 1 if any failed (2 for a bad sweep file, via main)."""
    echo = _flush_print
    if args.dry_run:
        spec = load_sweep(args.sweep)
        latest = latest_rows(read_rows(spec.output_dir / "sweep.csv")[1])
        cells = spec.cells()
        echo(f"fedsb sweep: {len(cells)} cells ({spec.shape}) on {spec.base} -> {spec.output_dir}"
             + (f"; {spec.tune} chosen per group on validation accuracy" if spec.tune else ""))
        for cell in cells:
            status = latest.get(cell.label, {}).get("status", "not run")
            echo(f"[{cell.index}/{len(cells)}] {status:<18} {cell.label}")
        return 0
    result = run_sweep(args.sweep, stream=args.stream, cpus_per_client=args.cpus_per_client, app_dir=args.app,
                       echo=echo)
    return 1 if result.failed else 0


def _flush_print(line: str) -> None:
    print(line, flush=True)

