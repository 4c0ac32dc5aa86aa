"""The sweep file: parsing and checking it, its axes (plain and linked), the grid of cells, and `tune`.

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

A list in a linked value expands into one value per element (several lists: their product), for
a key whose config type is not itself a list (`model.target_modules: [query, value]` stays one
value). This gives each method its own grid of another key, e.g. its own learning rates:

    grid:
      method:                                                  # 3 + 2 values
        - {method.name: fedsb, method.rank: 64, train.lr: [0.003, 0.01, 0.03]}
        - {method.name: ffa, method.rank: 16, train.lr: [0.0003, 0.001]}
      seed: [0, 1, 2]                                          # the repetitions
    tune: train.lr                   # or {key: train.lr, seeds: [0]}: see fedsb.analysis.sweep.tuning

(Numbers are read as YAML 1.2 and Python read them: 1e-3, 5E-4, .5 and 1_000 are numbers.)

Every error is a SweepError whose message is one line naming the key, checked against the config's
dataclasses (`check_config_key`) so that a typo stops here rather than after hours of runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedsb.experiment.config import ExperimentConfig, flatten, load_yaml

TOP_LEVEL_KEYS = ("base", "output_dir", "set", "grid", "tune", "engine", "keep", "compare")
ENGINE_NAMES = ("flower", "inprocess")  # fedsb.ops.launch.ENGINES (not imported: it is the launcher's)
# What a completed cell's run directory keeps: everything, or the small outputs a study commits
# (results/<study>/: the weights, prepared tokens and checkpoints are deleted once the cell is recorded).
KEEP_CHOICES = ("all", "results")
RESULT_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "comm.csv")
PIN_FILE = "sweep.json"  # in the sweep directory: the settings every cell shares, and the grid
RESERVED_KEYS = ("output_dir",)  # the sweep sets each cell's output_dir itself


class SweepError(ValueError):
    """A bad sweep file or sweep directory: the message is one line naming the key."""


@dataclass(frozen=True)
class Axis:
    """One grid axis. A plain axis sets one config key; a linked axis sets a few keys together."""

    name: str
    values: tuple[dict[str, Any], ...]  # each value as the overrides it applies

    @property
    def keys(self) -> list[str]:
        return unique(k for value in self.values for k in value)


@dataclass(frozen=True)
class Cell:
    index: int  # 1-based position in the grid
    overrides: dict[str, Any]  # the grid's overrides only (dotted keys)

    @property
    def label(self) -> str:
        """'method.name=fedsb privacy.epsilon=1': also valid `fedsb run --set` arguments."""
        return describe(self.overrides)


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    base: Path
    output_dir: Path  # absolute
    fixed: dict[str, Any]  # `set`
    axes: tuple[Axis, ...]
    tune: str | None = None  # the config key chosen per group on validation accuracy
    tune_seeds: tuple[int, ...] | None = None  # choose on these seeds' validation only (None: every seed)
    engine: str | None = None  # flower | inprocess; None: the command line's, else flower
    keep: str = "all"  # all | results (KEEP_CHOICES)
    # The setting every other one is compared with, seed by seed (paired differences), e.g.
    # {method.name: fedsb}; None: no paired comparison but against the centralised reference.
    compare: dict[str, Any] | None = None

    @property
    def columns(self) -> list[str]:
        """The config keys the grid varies: sweep.csv's grid columns."""
        return unique(k for axis in self.axes for k in axis.keys)

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
    return [describe(overrides) for overrides in grid_overrides(grid.values())]


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


def unique(items: Iterable[str]) -> list[str]:
    """The items in first-seen order, without repeats."""
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
            parsed += _expand_lists(_check_overrides(flatten(value), f"{where}[{i}]"), f"{where}[{i}]")
    else:
        if name in RESERVED_KEYS:
            raise SweepError(f"{where}: the sweep sets each cell's {name} (<sweep dir>/runs); remove it")
        check_config_key(name, where)
        parsed = [{name: v} for v in values]
    seen: list[dict[str, Any]] = []
    for value in parsed:
        if value in seen:
            raise SweepError(f"{where}: value {describe(value)} is listed twice")
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


def describe(overrides: Mapping[str, Any]) -> str:
    """'method.name=fedsb privacy.epsilon=1': a cell's label (valid `fedsb run --set` arguments)."""
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
    fixed = _check_overrides(flatten(fixed), "set")
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
        if "seeds" in tune and (not isinstance(seeds, list) or not seeds
                                or not all(isinstance(s, int) for s in seeds)):
            raise SweepError(f"tune.seeds: expected a non-empty list of seeds, got {seeds!r}")
        tune, tune_seeds = tune.get("key"), tuple(seeds) if seeds else None
    engine = data.get("engine")
    if engine is not None and engine not in ENGINE_NAMES:
        raise SweepError(f"engine: got {engine!r}; accepted: {' or '.join(ENGINE_NAMES)}")
    keep = data.get("keep", "all")
    if keep not in KEEP_CHOICES:
        raise SweepError(f"keep: got {keep!r}; accepted: {' or '.join(KEEP_CHOICES)}")
    compare = data.get("compare")
    if compare is not None:
        if not isinstance(compare, Mapping) or not compare:
            raise SweepError("compare: expected a mapping of grid keys to values, e.g. "
                             f"{{method.name: fedsb}}, got {compare!r}")
        for k in compare:
            if k not in owner:
                raise SweepError(f"compare.{k}: not set by any grid axis (grid keys: {', '.join(owner)})")
        compare = dict(compare)
    return SweepSpec(path, base, output_dir, fixed, axes, _check_tune(tune, list(owner)), tune_seeds,
                     engine, keep, compare)


def _check_tune(tune: Any, grid_keys: Sequence[str]) -> str | None:
    if tune is None:
        return None
    if isinstance(tune, list):  # several keys tuned together: one joint key (fedsb.analysis.sweep.tuning)
        if not tune:
            raise SweepError("tune.key: expected a config key or a non-empty list of them")
        for k in tune:
            _check_tune(k, grid_keys)
        return "+".join(tune)
    if not isinstance(tune, str) or not tune:
        raise SweepError(f"tune: expected a config key to choose on validation, e.g. train.lr, got {tune!r}")
    if tune == "seed":
        raise SweepError("tune: seed is the repetition the tuning averages over; name another grid key, "
                         "e.g. train.lr")
    if tune not in grid_keys:
        raise SweepError(f"tune: {tune} is not set by any grid axis (grid keys: {', '.join(grid_keys)}); "
                         f"give it values in the grid, e.g. {tune}: [...]")
    return tune


# --- the sweep directory's record of its settings (sweep.json) ------------------------------------

def read_pin(sweep_dir: Path) -> dict[str, Any]:
    """<sweep dir>/sweep.json as `record_pin` wrote it; {} if there is none (or it does not parse)."""
    try:
        data = json.loads((sweep_dir / PIN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def record_pin(spec: SweepSpec) -> None:
    """Check that the sweep directory holds results of this sweep's shared settings, and record them.

    The settings every cell shares (the base config's content and `set`) are pinned on the first
    run: a second run with other shared settings stops rather than mix results of two different
    experiments in one sweep.csv. The grid may grow.
    """
    pin_path = spec.output_dir / PIN_FILE
    pin = spec.pin()
    old = read_pin(spec.output_dir)
    if old:
        for k in ("base_sha256", "set"):  # the base's content, not its path: a moved clone still resumes
            if old.get(k) != pin[k]:
                what = {"base_sha256": "another or a changed base config", "set": "other `set` overrides"}[k]
                raise SweepError(f"output_dir: {spec.output_dir} holds a sweep run with {what} "
                                 f"(see {pin_path}); choose another output_dir or remove that directory")
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    # Not pinned (a record for `fedsb plot`): the grid may grow, and tuning only reads the results.
    # Paths relative to the sweep directory: a sweep directory kept in a repository names no machine's.
    record = {**pin, "base": os.path.relpath(spec.base, spec.output_dir),
              "sweep_file": os.path.relpath(spec.path.resolve(), spec.output_dir),
              "grid": {axis.name: list(axis.values) for axis in spec.axes}, "tune": spec.tune,
              "tune_seeds": list(spec.tune_seeds) if spec.tune_seeds else None, "compare": spec.compare}
    pin_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
