"""What the figures read: a run directory (RunData) and a sweep directory (SweepData), its completed
cells grouped over seeds into settings (Setting), and, for a tuned sweep, each group at its chosen value.

A run's summary.json and metrics.jsonl are read through their schema (`fedsb.experiment.summary`):
a field the run recorder does not write is an error at once. A sweep's rows are sweep.csv's
(fedsb.analysis.sweep.table), typed here.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsb.analysis.plots.style import method_style
from fedsb.analysis.sweep.compare import PairedDifference, paired_differences
from fedsb.analysis.sweep.spec import format_value, grid_labels, parse_value, read_pin
from fedsb.analysis.sweep.table import COMPLETED, COMPONENTS, SWEEP_CSV, grid_columns, latest_rows, read_rows
from fedsb.analysis.sweep.tuning import (
    LABELLED_KEYS,
    TunedGroup,
    in_grid_order,
    setting_label,
    tune_keys,
    tune_results,
)
from fedsb.experiment.summary import METRICS_FILE, SUMMARY_FILE, MetricsRow, RunSummary, read_metrics

COMM_CSV = "comm.csv"  # fedsb.experiment.meter: one row per message part (round, direction, component)
NUMERIC_FIELDS = (  # the sweep.csv fields read as numbers
    "rank", "lr", "seed", "epsilon_target", "epsilon_max", "delta", "noise_multiplier",
    "initial_val_accuracy", "final_val_accuracy", "best_val_accuracy", "best_round", "test_accuracy",
    "final_test_accuracy", "rounds", "rounds_completed", "bytes_up", "bytes_down", "bytes_total",
    "wire_bytes_up", "wire_bytes_down", "wall_s", "elapsed_s",
    *(f"bytes_{d}_{c}" for d in ("up", "down") for c in COMPONENTS))
PRIVACY_PREFIX = "privacy."


@dataclass
class RunData:
    """What the figures need from one run directory."""

    path: Path
    summary: RunSummary | None  # None: the run has not finished (or failed before its summary)
    metrics: list[MetricsRow]  # metrics.jsonl, one row per round
    comm: list[dict[str, Any]]  # comm.csv rows (round, direction, component, bytes as numbers)


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    summary = RunSummary.read(run_dir) if (run_dir / SUMMARY_FILE).is_file() else None
    metrics = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
    comm: list[dict[str, Any]] = []
    if (run_dir / COMM_CSV).is_file():
        with open(run_dir / COMM_CSV, newline="") as f:
            for row in csv.DictReader(f):
                comm.append({**row, "round": int(row["round"]), "bytes": int(row["bytes"])})
    return RunData(run_dir, summary, metrics, comm)


@dataclass
class Setting:
    """One configuration of a sweep (or one run): its completed cells, one per seed."""

    label: str  # e.g. 'fedsb r=16 ε=1'
    variant: str  # the label without the privacy tag: one series of the privacy figure
    method: str  # the config's method.name
    method_label: str  # how legends name the method: its runs' summary.json method_label
    rank: int
    private: bool
    epsilon: float | None  # the target epsilon of a private setting
    rows: list[dict[str, Any]]  # typed sweep.csv rows
    runs: list[RunData] = field(default_factory=list)
    centralised: bool = False  # all clients' data in one client: a reference, not a federated result

    def values(self, name: str) -> list[float]:
        return [float(r[name]) for r in self.rows if r.get(name) is not None]

    def stat(self, name: str) -> tuple[float, float, float]:
        """(mean, min, max) over seeds; NaN if no cell has the value."""
        v = self.values(name)
        if not v:
            return math.nan, math.nan, math.nan
        mean = min(max(sum(v) / len(v), min(v)), max(v))  # equal values: no rounding outside [min, max]
        return mean, min(v), max(v)

    @property
    def style(self) -> tuple[str, str]:
        return method_style(self.method)


@dataclass
class SweepData:
    path: Path
    columns: list[str]  # the grid's config keys
    rows: list[dict[str, Any]]  # the latest row of every cell, typed
    settings: list[Setting]  # completed cells grouped over seeds
    tune: str | None = None  # the sweep file's `tune` (from sweep.json)
    tuned: list[TunedGroup] = field(default_factory=list)  # with `tune`: each group at its chosen value
    pin: dict[str, Any] = field(default_factory=dict)  # sweep.json (fedsb.analysis.sweep.spec.record_pin)
    pairs: list[PairedDifference] = field(default_factory=list)  # with `tune`: paired.csv's comparisons

    def chosen_settings(self) -> list[Setting]:
        """With `tune`, the settings at each group's chosen value; otherwise all of them."""
        if self.tune is None:
            return self.settings
        cells = {cell for group in self.tuned for cell in group.cells}
        return [s for s in self.settings if any(r["cell"] in cells for r in s.rows)]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != COMPLETED]


def _typed(row: Mapping[str, str], columns: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(row)
    for k in columns:
        out[k] = parse_value(row.get(k, "") or "")
    for k in NUMERIC_FIELDS:
        text = row.get(k, "")
        out[k] = float(text) if text not in ("", None) else None
    for k in ("rank", "seed"):
        out[k] = int(out[k]) if out[k] is not None else None
    for k in ("private", "privacy_requested", "oracle", "centralised"):
        out[k] = row.get(k) == "true"
    return out


def load_sweep_dir(sweep_dir: str | Path, *, with_runs: bool = True) -> SweepData:
    """sweep.csv's latest row per cell, and its completed cells grouped over seeds into settings;
    with the sweep's `tune` (sweep.json), each group at its value chosen on validation."""
    sweep_dir = Path(sweep_dir)
    header, raw = read_rows(sweep_dir / SWEEP_CSV)
    columns = grid_columns(header)
    rows = [_typed(r, columns) for r in latest_rows(raw).values()]
    done = [r for r in rows if r["status"] == COMPLETED]
    settings = group_settings(done, columns)
    if with_runs:
        for s in settings:
            s.runs = [load_run(_resolve(sweep_dir, r["run_dir"])) for r in s.rows]
    pin = read_pin(sweep_dir)
    tune = pin.get("tune")
    tune = tune if isinstance(tune, str) and all(k in columns for k in tune_keys(tune)) else None
    tuned: list[TunedGroup] = []
    if tune:  # in grid order (a tie goes to the first value), as `fedsb sweep` wrote tuned.csv
        grid = pin.get("grid")
        tuned = tune_results(in_grid_order(raw, grid_labels(grid)) if isinstance(grid, dict) else raw,
                             columns, tune, pin.get("tune_seeds"))
    pairs = paired_differences(tuned, pin.get("compare")) if tuned else []
    return SweepData(sweep_dir, columns, rows, settings, tune, tuned, pin, pairs)


def _resolve(sweep_dir: Path, run_dir: str) -> Path:
    path = Path(run_dir)
    return path if path.is_absolute() else sweep_dir / path


def _privacy_tag(row: Mapping[str, Any]) -> str:
    if not row.get("privacy_requested"):
        return "no DP"
    target = row.get("epsilon_target")
    if row.get("private"):
        return f"ε={target:g}"
    if str(row.get("privacy_status", "")).startswith("not private"):
        return f"ε={target:g} not private"  # DP-SGD ran, but the guarantee does not hold
    return f"ε={target:g} requested, not applied"


def group_settings(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[Setting]:
    """Group completed rows by their grid values except the seed; label what varies."""
    keyed: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = tuple(format_value(r.get(c)) for c in columns if c != "seed")
        keyed.setdefault(key, []).append(r)
    varied = [c for c in columns if c != "seed" and len({format_value(r.get(c)) for r in rows}) > 1]
    show_privacy = any(c.startswith(PRIVACY_PREFIX) for c in columns) or \
        len({_privacy_tag(r) for r in rows}) > 1
    settings = []
    for group in keyed.values():
        first = group[0]
        extras = [f"{c}={format_value(first.get(c))}" for c in varied
                  if c not in LABELLED_KEYS and not c.startswith(PRIVACY_PREFIX)]
        if first.get("oracle"):  # the pooled-data init: never to be read as a federated result
            extras.append("(oracle init)")
        centralised = bool(first.get("centralised"))
        # A sweep.csv written before sweep.csv had method_label: the config's method name stands in.
        method_label = first.get("method_label") or first["method"]
        variant = setting_label(first["method"], first["rank"], centralised, extras, method_label)
        label = f"{variant} {_privacy_tag(first)}" if show_privacy else variant
        private = bool(first.get("private"))
        settings.append(Setting(label, variant, first["method"], method_label, first["rank"], private,
                                first.get("epsilon_target") if private else None, group,
                                centralised=centralised))
    return settings


def run_setting(run: RunData) -> Setting:
    """A single run directory as a one-seed setting (for the round figures)."""
    s = run.summary
    if s is None:  # no summary yet: the round figures still show what metrics.jsonl has
        return Setting(run.path.name, run.path.name, "?", "?", 0, False, None, [{}], [run])
    label = setting_label(s.method, s.rank, s.centralised, method_label=s.method_label)
    row = {"test_accuracy": s.test_accuracy, "final_test_accuracy": s.final_test_accuracy,
           "best_val_accuracy": s.best_val_accuracy}
    return Setting(label, label, s.method, s.method_label, s.rank, s.privacy.enabled, None, [row], [run],
                   centralised=s.centralised)
