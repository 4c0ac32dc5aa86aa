"""Tuning: per group of cells, the value of one config key chosen on validation, and tuned.csv.

With `tune: <config key>` in the sweep file (a key some grid axis sets, typically train.lr), the
cells are grouped by their grid values less the tuned key and `seed`; in each group the value of
the tuned key with the highest mean `best_val_accuracy` over its completed seeds is chosen (ties:
the first in grid order). Selection reads the validation split only; the test accuracy at the
chosen value (mean and sample std over seeds) is what is reported.

Several keys are tuned together with `tune: {key: [train.lr, privacy.max_grad_norm]}`: each
combination of their values is a candidate, written 'train.lr+privacy.max_grad_norm' = '0.001+0.1'.

Successive halving over seeds: `tune: {key: train.lr, seeds: [0]}` chooses on those seeds'
validation only, so every value runs on seed 0 and only the chosen one on the other seeds.

At the end of a sweep, <sweep dir>/tuned.csv has one row per group (TUNED_FIELDS, with the group's
grid values after `group`); `fedsb plot` reads the same selection (tune_results). A run with
`federation.centralised: true` (every client's data pooled in one client) is a reference, not a
federated result, and is labelled so (setting_label), by its run's `method_label`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsb.analysis.sweep.spec import format_value, unique
from fedsb.analysis.sweep.stats import Interval, t_interval
from fedsb.analysis.sweep.table import COMPLETED, csv_value, latest_rows

LABELLED_KEYS = ("method.name", "method.rank", "federation.centralised")  # said by setting_label itself
TUNED_FIELDS = (
    "group", "method", "method_label", "rank", "centralised", "tune_key", "tune_value", "seeds",
    "seeds_failed", "val_accuracy_mean", "test_accuracy_mean", "test_accuracy_std",
    "test_accuracy_ci95_low", "test_accuracy_ci95_high", "test_accuracy_ci95_half_width",
    "final_test_accuracy_mean", "final_test_accuracy_std", "final_test_accuracy_ci95_low",
    "final_test_accuracy_ci95_high", "bytes_up_mean", "bytes_down_mean",
    "bytes_total_mean", "elapsed_s_mean",
    "test_accuracy_at_rank_mean",  # clients of different ranks: {"4": mean over seeds, ...} (JSON)
    "candidates",
)


TUNE_JOIN = "+"  # several keys tuned together: 'train.lr+privacy.max_grad_norm', values '0.001+0.1'


def tune_keys(tune_key: str) -> list[str]:
    """The config keys a (possibly joint) tune key names."""
    return tune_key.split(TUNE_JOIN)


def setting_label(method: str, rank: Any, centralised: bool = False, extras: Sequence[str] = (),
                  method_label: str | None = None) -> str:
    """'fedsb r=16 privacy.epsilon=1'; a centralised run is named by what it trains (its run's
    `method_label`, e.g. 'LoRA') and marked as the reference it is: 'LoRA r=8, centralised (not
    federated)'. Without a method_label (the run left no summary) the method's config name stands in."""
    if centralised:
        name = method_label or method
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
    method_label: str  # the runs' summary.json method_label (the method's config name if none ran)
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
    # The chosen cells' adapters truncated to each rank (summary.json test_accuracy_at_rank), by rank.
    test_accuracy_at_rank: dict[str, Stat] = dataclasses.field(default_factory=dict)
    select_seeds: tuple[int, ...] | None = None  # the seeds whose validation chose (None: every seed)
    # seed (sweep.csv text) -> the chosen cell's test accuracy, and after the last round: for pairing
    test_by_seed: dict[str, float] = dataclasses.field(default_factory=dict)
    final_test_by_seed: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def seeds(self) -> int:
        return self.chosen.seeds if self.chosen else 0

    @property
    def test_interval(self) -> Interval | None:
        """The mean test accuracy and its 95% confidence interval over the seeds."""
        return t_interval(list(self.test_by_seed.values()))

    @property
    def final_test_interval(self) -> Interval | None:
        return t_interval(list(self.final_test_by_seed.values()))


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
    group_columns = [c for c in columns if c not in (*tune_keys(tune_key), "seed")]
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
        by_value.setdefault(TUNE_JOIN.join(_text(row.get(k)) for k in tune_keys(tune_key)), []).append(row)
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
    # The name of what the runs trained, as their summaries give it (a row of a run that never
    # finished has none: then the method's config name).
    method_label = str(next((r["method_label"] for r in rows if r.get("method_label")), method))
    rank = _number(first.get("rank") or grid.get("method.rank"))
    centralised = _text(first.get("centralised") or grid.get("federation.centralised")) == "true"
    extras = [f"{c}={grid[c]}" for c in varied]
    if _text(first.get("oracle")) == "true":
        extras.append("(oracle init)")
    label = setting_label(method, int(rank) if rank is not None else "?", centralised, extras, method_label)
    common = dict(label=label, grid=grid, method=method, method_label=method_label,
                  rank=int(rank) if rank is not None else None, centralised=centralised, tune_key=tune_key,
                  candidates=tuple(candidates), chosen=chosen,
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
                      elapsed_s=Stat.of(_values(done, "elapsed_s")),
                      test_accuracy_at_rank=_at_rank(done),
                      test_by_seed=_by_seed(done, "test_accuracy"),
                      final_test_by_seed=_by_seed(done, "final_test_accuracy"))


def _by_seed(rows: Sequence[Mapping[str, Any]], name: str) -> dict[str, float]:
    """seed -> the rows' value of `name` (rows without a number left out)."""
    return {_text(r.get("seed")): v for r in rows if (v := _number(r.get(name))) is not None}


def _at_rank(rows: Sequence[Mapping[str, Any]]) -> dict[str, Stat]:
    """rank -> Stat of the rows' test_accuracy_at_rank (JSON text in sweep.csv), ranks in order."""
    by_rank: dict[str, list[float]] = {}
    for row in rows:
        text = row.get("test_accuracy_at_rank")
        for rank, accuracy in (json.loads(text) if text else {}).items():
            by_rank.setdefault(rank, []).append(float(accuracy))
    return {rank: Stat.of(by_rank[rank]) for rank in sorted(by_rank, key=int)}


def in_grid_order(rows: Iterable[Mapping[str, Any]], labels: Sequence[str]) -> list[Mapping[str, Any]]:
    """The latest row of each cell named in `labels`, in that order (cells of an older grid left out)."""
    latest = latest_rows(rows)
    return [latest[label] for label in labels if label in latest]


def tuned_row(group: TunedGroup) -> dict[str, Any]:
    """A tuned.csv row (TUNED_FIELDS, the group's grid values after `group`)."""
    chosen = group.chosen
    candidates = "; ".join(
        f"{c.value}: val {csv_value(c.val_mean) or '-'}, test {csv_value(c.test_mean) or '-'}, n {c.seeds}"
        for c in group.candidates)
    return {"group": group.label, **group.grid, "method": group.method, "method_label": group.method_label,
            "rank": group.rank, "centralised": group.centralised, "tune_key": group.tune_key,
            "tune_value": chosen.value if chosen else None, "seeds": group.seeds,
            "seeds_failed": chosen.failed if chosen else None, "val_accuracy_mean": group.val_accuracy.mean,
            "test_accuracy_mean": group.test_accuracy.mean, "test_accuracy_std": group.test_accuracy.std,
            **_ci_fields("test_accuracy", group.test_interval),
            "final_test_accuracy_mean": group.final_test_accuracy.mean,
            "final_test_accuracy_std": group.final_test_accuracy.std,
            **_ci_fields("final_test_accuracy", group.final_test_interval, half_width=False),
            "bytes_up_mean": group.bytes_up.mean,
            "bytes_down_mean": group.bytes_down.mean, "bytes_total_mean": group.bytes_total.mean,
            "elapsed_s_mean": group.elapsed_s.mean,
            "test_accuracy_at_rank_mean": _at_rank_text(group.test_accuracy_at_rank),
            "candidates": candidates}


def _ci_fields(name: str, interval: Interval | None, half_width: bool = True) -> dict[str, Any]:
    """The 95% interval's ends (and half width) as tuned.csv columns; empty with fewer than two seeds."""
    known = interval is not None and interval.n > 1
    fields = {f"{name}_ci95_low": interval.low if known else None,
              f"{name}_ci95_high": interval.high if known else None}
    if half_width:
        fields[f"{name}_ci95_half_width"] = interval.half_width if known else None
    return fields


def _at_rank_text(by_rank: Mapping[str, Stat]) -> str | None:
    return json.dumps({r: round(v.mean, 6) for r, v in by_rank.items()}) if by_rank else None


def write_tuned(path: Path, groups: Sequence[TunedGroup]) -> None:
    """tuned.csv: one row per group."""
    grid = unique(k for g in groups for k in g.grid)
    header = unique(["group", *grid, *TUNED_FIELDS])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, header, restval="")
        writer.writeheader()
        for group in groups:
            writer.writerow({k: csv_value(v) for k, v in tuned_row(group).items()})
