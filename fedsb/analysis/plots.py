"""`fedsb plot DIR`: figures and a report.md for a sweep directory or a run directory.

Figures (PNG and SVG, written to DIR/report/ unless --out says otherwise):

Accuracy: every run evaluates each round on a validation split; the round with the best
validation accuracy is chosen, and the test split at that round (`test_accuracy`) is the number
reported (`final_test_accuracy`: the test split after the last round). The sweep figures and the
frontier use `test_accuracy` unless --metric says final_test_accuracy.

- comm_vs_accuracy: total bytes of a run (up + down, all clients, one-time init included; log
  scale) against test accuracy; one marker per setting (method and rank, and whatever else the
  grid varies), colour and marker shape per method; the Pareto frontier (fewest bytes for the
  accuracy) drawn as a step line. A centralised run (every client's data in one client:
  federation.centralised) is a labelled horizontal reference line, never a marker or on the
  frontier. Sweeps only.
- privacy_vs_utility: the target epsilon against test accuracy, one line per method and rank,
  the non-private result of the same method and rank as a dotted horizontal reference line.
  Sweeps with at least one run that reports privacy (a run without a `privacy` object in its
  summary.json is not private, whatever its config asked for).
- accuracy_vs_round and bytes_vs_round: validation accuracy and cumulative bytes (up + down) per
  round, one line per setting.
- bytes_by_component: bytes per round by component (lora_A, lora_B, lora_R, residual, head,
  init), stacked; download and upload side by side. One panel per method and rank.

Where a setting has several seeds, markers and lines are the mean over seeds, and bars or bands
span the minimum to the maximum. Colours are the Okabe-Ito palette (distinguishable with the
common colour-vision deficiencies), and every method also has its own marker shape.

A tuned sweep (the sweep file's `tune`, recorded in <sweep dir>/sweep.json) is reported per group
at the value chosen on validation (fedsb.analysis.sweep.tune_results, as in tuned.csv): report.md starts
with that table and the values tried per group; comm_vs_accuracy has one marker per group at
(mean bytes, mean test accuracy) with error bars of ± one sample standard deviation over seeds,
the frontier over the federated groups and each centralised reference as a horizontal line; the
other figures show the chosen settings only.

Every figure function returns a matplotlib Figure (built without pyplot, so nothing is kept
in a global figure registry and no display is needed), so tests can inspect the artists: data
series carry gid "series", spread bands "spread", reference lines "reference" and the Pareto
frontier "frontier".
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter, NullFormatter, ScalarFormatter

from fedsb.analysis.sweep import (
    COMPLETED,
    COMPONENTS,
    LABELLED_KEYS,
    Stat,
    TunedGroup,
    format_value,
    grid_columns,
    grid_labels,
    human_bytes,
    in_grid_order,
    latest_rows,
    mean_std_text,
    parse_value,
    read_rows,
    setting_label,
    tune_results,
)

# Okabe & Ito (2008), "Color Universal Design": safe for the common colour-vision deficiencies.
OKABE_ITO = {"orange": "#E69F00", "sky_blue": "#56B4E9", "green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "black": "#000000"}
METHOD_STYLE = {  # colour and marker: two cues per method, so colour alone never carries it
    "fedit": (OKABE_ITO["vermillion"], "s"),
    "ffa": (OKABE_ITO["sky_blue"], "^"),
    "fedex": (OKABE_ITO["purple"], "D"),
    "fedsb": (OKABE_ITO["blue"], "o"),
}
METHOD_NAMES = {"fedit": "FedIT", "ffa": "FFA-LoRA", "fedex": "FedEx-LoRA", "fedsb": "Fed-SB"}
COMPONENT_COLORS = {"lora_A": OKABE_ITO["orange"], "lora_B": OKABE_ITO["sky_blue"],
                    "lora_R": OKABE_ITO["green"], "residual": OKABE_ITO["purple"],
                    "head": OKABE_ITO["blue"], "init": OKABE_ITO["yellow"]}
LINESTYLES = ("-", "--", "-.", ":")
NUMERIC_FIELDS = (
    "rank", "lr", "seed", "epsilon_target", "epsilon_max", "delta", "noise_multiplier",
    "initial_val_accuracy", "final_val_accuracy", "best_val_accuracy", "best_round", "test_accuracy",
    "final_test_accuracy", "rounds", "rounds_completed", "bytes_up", "bytes_down", "bytes_total",
    "wire_bytes_up", "wire_bytes_down", "wall_s", "elapsed_s",
    *(f"bytes_{d}_{c}" for d in ("up", "down") for c in COMPONENTS))
METRICS = {  # the accuracy of the sweep figures and the frontier (--metric), as an axis label
    "test_accuracy": "test accuracy (at the best validation round)",
    "final_test_accuracy": "final-round test accuracy",
}
PRIVACY_PREFIX = "privacy."
FIGURE_TITLES = {
    "comm_vs_accuracy": "Communication vs accuracy",
    "privacy_vs_utility": "Privacy vs utility",
    "accuracy_vs_round": "Validation accuracy per round",
    "bytes_vs_round": "Cumulative bytes per round",
    "bytes_by_component": "Bytes per round by component",
}



def _method_style(method: str) -> tuple[str, str]:
    return METHOD_STYLE.get(method, (OKABE_ITO["black"], "x"))


# --- reading run and sweep directories -----------------------------------------------------------

@dataclass
class RunData:
    """What the figures need from one run directory."""

    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]  # metrics.jsonl, one row per round
    comm: list[dict[str, Any]]  # comm.csv rows (round, direction, component, bytes as numbers)


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    metrics_path = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
        if metrics_path.is_file() else []
    comm: list[dict[str, Any]] = []
    if (run_dir / "comm.csv").is_file():
        with open(run_dir / "comm.csv", newline="") as f:
            for row in csv.DictReader(f):
                comm.append({**row, "round": int(row["round"]), "bytes": int(row["bytes"])})
    return RunData(run_dir, summary, metrics, comm)


@dataclass
class Setting:
    """One configuration of a sweep (or one run): its completed cells, one per seed."""

    label: str  # e.g. 'fedsb r=16 ε=1'
    variant: str  # the label without the privacy tag: one series of the privacy figure
    method: str
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
        return _method_style(self.method)


@dataclass
class SweepData:
    path: Path
    columns: list[str]  # the grid's config keys
    rows: list[dict[str, Any]]  # the latest row of every cell, typed
    settings: list[Setting]  # completed cells grouped over seeds
    tune: str | None = None  # the sweep file's `tune` (from sweep.json)
    tuned: list[TunedGroup] = field(default_factory=list)  # with `tune`: each group at its chosen value

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
    header, raw = read_rows(sweep_dir / "sweep.csv")
    columns = grid_columns(header)
    rows = [_typed(r, columns) for r in latest_rows(raw).values()]
    done = [r for r in rows if r["status"] == COMPLETED]
    settings = group_settings(done, columns)
    if with_runs:
        for s in settings:
            s.runs = [load_run(_resolve(sweep_dir, r["run_dir"])) for r in s.rows]
    pin = _read_pin(sweep_dir)
    tune = pin.get("tune") if pin.get("tune") in columns else None
    tuned: list[TunedGroup] = []
    if tune:  # in grid order (a tie goes to the first value), as `fedsb sweep` wrote tuned.csv
        grid = pin.get("grid")
        tuned = tune_results(in_grid_order(raw, grid_labels(grid)) if isinstance(grid, dict) else raw,
                             columns, tune, pin.get("tune_seeds"))
    return SweepData(sweep_dir, columns, rows, settings, tune, tuned)


def _read_pin(sweep_dir: Path) -> dict[str, Any]:
    """<sweep dir>/sweep.json (written by `fedsb sweep`); {} if there is none."""
    path = sweep_dir / "sweep.json"
    return json.loads(path.read_text()) if path.is_file() else {}


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
        variant = setting_label(first["method"], first["rank"], centralised, extras)
        label = f"{variant} {_privacy_tag(first)}" if show_privacy else variant
        private = bool(first.get("private"))
        settings.append(Setting(label, variant, first["method"], first["rank"], private,
                                first.get("epsilon_target") if private else None, group,
                                centralised=centralised))
    return settings


def run_setting(run: RunData) -> Setting:
    """A single run directory as a one-seed setting (for the round figures)."""
    s = run.summary
    privacy = s.get("privacy") or {}
    centralised = bool(s.get("centralised"))
    label = setting_label(s.get("method", "?"), s.get("rank", "?"), centralised)
    row = {k: s.get(k) for k in ("test_accuracy", "final_test_accuracy", "best_val_accuracy")}
    return Setting(label, label, s.get("method", "?"), s.get("rank", 0), bool(privacy.get("enabled")),
                   None, [row], [run], centralised=centralised)


# --- the Pareto frontier ------------------------------------------------------------------------

def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (fewer x, higher y), by x.

    A point is kept if every point with less or equal x has strictly lower y; of identical
    points the first is kept.
    """
    known = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    order = sorted(known, key=lambda i: (points[i][0], -points[i][1], i))
    frontier, best = [], -math.inf
    for i in order:
        y = points[i][1]
        if y > best:
            frontier.append(i)
            best = y
    return frontier


# --- figures ---------------------------------------------------------------------------------------

def _figure(width: float = 7.0, height: float = 4.4) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # headless: the Agg canvas renders PNG (SVG goes through its own backend)
    return fig


def _legend(ax: Any, n: int, **kwargs: Any) -> None:
    """Inside the axes (matplotlib's best place) when short, outside on the right when long."""
    if n > 6:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, **kwargs)
    else:
        ax.legend(fontsize=8, **kwargs)


def _spread_note(settings: Sequence[Setting]) -> str:
    seeds = max((len(s.rows) for s in settings), default=1)
    return f"mean over up to {seeds} seeds; bars/bands: min to max" if seeds > 1 else "one seed per setting"


def _styles(settings: Sequence[Setting], key: Callable[[Setting], str]) -> dict[str, str]:
    """A line style per distinct key within each method (the colour already names the method)."""
    styles: dict[str, str] = {}
    count: dict[str, int] = {}
    for s in settings:
        k = key(s)
        if k not in styles:
            styles[k] = LINESTYLES[count.get(s.method, 0) % len(LINESTYLES)]
            count[s.method] = count.get(s.method, 0) + 1
    return styles


def _log_bytes_axis(axis: Any, values: Iterable[float]) -> None:
    """Bytes on a log axis in kB/MB/GB; minor ticks labelled too when the data span under a decade
    (otherwise such an axis would show no label, or matplotlib's 8x10^4 style)."""
    axis.set_major_formatter(EngFormatter(unit="B"))
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    narrow = bool(positive) and max(positive) / min(positive) < 10
    axis.set_minor_formatter(EngFormatter(unit="B") if narrow else NullFormatter())


def _round_ticks(ax: Any, rounds: Sequence[int]) -> None:
    """Integer rounds on the x axis, however few (matplotlib would otherwise show 0.95, 1.0, ...)."""
    if not rounds:
        return
    ax.set_xticks(rounds if len(rounds) <= 12 else list(rounds)[::math.ceil(len(rounds) / 12)])
    ax.set_xlim(rounds[0] - 0.3, rounds[-1] + 0.3)


def _frontier_line(ax: Any, points: Sequence[tuple[float, float]]) -> None:
    frontier = pareto_frontier(points)
    if frontier:
        ax.plot([points[i][0] for i in frontier], [points[i][1] for i in frontier], drawstyle="steps-post",
                color="0.35", linestyle="--", linewidth=1.2, zorder=1, gid="frontier",
                label="Pareto frontier")


def _reference_line(ax: Any, y: float, lo: float, hi: float, color: str, label: str) -> None:
    """A result drawn across the axes rather than as a point (no DP; the centralised run), its
    spread over seeds as a band."""
    ax.axhline(y, color=color, linestyle=":", linewidth=1.5, gid="reference", label=label)
    if hi > lo:
        ax.axhspan(lo, hi, color=color, alpha=0.08, gid="spread")


def _comm_axes(ax: Any, bytes_values: Sequence[float], metric: str, note: str) -> None:
    ax.set_xscale("log")
    _log_bytes_axis(ax.xaxis, bytes_values)
    ax.set_xlabel("total communication per run: upload + download, all clients, incl. one-time init "
                  "(bytes, log scale)", fontsize=9)
    ax.set_ylabel(METRICS.get(metric, metric.replace("_", " ")), fontsize=9)
    ax.set_title(f"{FIGURE_TITLES['comm_vs_accuracy']} ({note})", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, len(ax.get_legend_handles_labels()[0]))


def comm_vs_accuracy(settings: Sequence[Setting], metric: str = "test_accuracy") -> Figure:
    """Total bytes (log x) against accuracy: one marker per federated setting (bars: min to max over
    seeds) and the Pareto frontier over them; a centralised setting is a horizontal reference line."""
    fig = _figure()
    ax = fig.subplots()
    federated = [s for s in settings if not s.centralised]
    points = [(s.stat("bytes_total")[0], s.stat(metric)[0]) for s in federated]
    for method in dict.fromkeys(s.method for s in federated):
        mine = sorted((i for i, s in enumerate(federated) if s.method == method), key=lambda i: points[i][0])
        color, marker = federated[mine[0]].style
        xs = [points[i][0] for i in mine]
        ys = [points[i][1] for i in mine]
        stats = [federated[i].stat(metric) for i in mine]
        bytes_stats = [federated[i].stat("bytes_total") for i in mine]
        yerr = [[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]]
        xerr = [[m - lo for m, lo, _ in bytes_stats], [hi - m for m, _, hi in bytes_stats]]
        container = ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, fmt=marker, linestyle="none", color=color,
                                markersize=7, capsize=3, label=METHOD_NAMES.get(method, method))
        container.lines[0].set_gid("series")
        for i in mine:  # the rest of the label (the colour and marker already say the method)
            tag = federated[i].label.removeprefix(federated[i].method).strip()
            ax.annotate(tag, points[i], xytext=(5, 4), textcoords="offset points", fontsize=7, color="0.25")
    _frontier_line(ax, points)
    for s in settings:
        if s.centralised:
            _reference_line(ax, *s.stat(metric), s.style[0], s.label)
    _comm_axes(ax, [x for x, _ in points], metric, _spread_note(settings))
    return fig


def tuned_comm_vs_accuracy(groups: Sequence[TunedGroup], metric: str = "test_accuracy") -> Figure:
    """A tuned sweep: one marker per federated group at its chosen value, at (mean total bytes, mean
    accuracy) with error bars of ± one sample std over seeds; the Pareto frontier over these groups;
    each centralised group a horizontal reference line (band: ± std)."""
    fig = _figure()
    ax = fig.subplots()
    chosen = [g for g in groups if g.chosen is not None and _group_stat(g, metric).mean is not None]
    federated = [g for g in chosen if not g.centralised]
    points = [(_nan(g.bytes_total.mean), _nan(_group_stat(g, metric).mean)) for g in federated]
    for method in dict.fromkeys(g.method for g in federated):
        mine = sorted((i for i, g in enumerate(federated) if g.method == method), key=lambda i: points[i][0])
        color, marker = _method_style(method)
        container = ax.errorbar([points[i][0] for i in mine], [points[i][1] for i in mine],
                                yerr=[_group_stat(federated[i], metric).std or 0.0 for i in mine], fmt=marker,
                                linestyle="none", color=color, markersize=7, capsize=3,
                                label=METHOD_NAMES.get(method, method))
        container.lines[0].set_gid("series")
        for i in mine:
            ax.annotate(_tuned_tag(federated[i]), points[i], xytext=(5, 4), textcoords="offset points",
                        fontsize=7, color="0.25")
    _frontier_line(ax, points)
    for g in chosen:
        if g.centralised:
            stat = _group_stat(g, metric)
            mean, std = _nan(stat.mean), stat.std or 0.0
            _reference_line(ax, mean, mean - std, mean + std, _method_style(g.method)[0],
                            f"{g.label}, {_short_key(g.tune_key)}={g.chosen.value if g.chosen else '?'}")
    _comm_axes(ax, [x for x, _ in points], metric, _tuned_note(groups))
    return fig


def _group_stat(group: TunedGroup, metric: str) -> Stat:
    if metric not in METRICS:
        raise ValueError(f"metric: got {metric!r}; accepted: {', '.join(METRICS)}")
    return getattr(group, metric)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _short_key(key: str) -> str:
    return key.rsplit(".", 1)[-1]  # train.lr -> lr


def _tuned_tag(group: TunedGroup) -> str:
    """A marker's annotation: the label less the method (the colour and marker say it), and the value."""
    rest = group.label.removeprefix(group.method).strip()
    return f"{rest} {_short_key(group.tune_key)}={group.chosen.value if group.chosen else '?'}".strip()


def _tuned_note(groups: Sequence[TunedGroup]) -> str:
    seeds = max((g.seeds for g in groups), default=0)
    tune = groups[0].tune_key if groups else "the tuned key"
    spread = f"mean ± std over up to {seeds} seeds" if seeds > 1 else "one seed per setting"
    return f"{tune} chosen on validation; {spread}"


def privacy_vs_utility(settings: Sequence[Setting], metric: str = "test_accuracy") -> Figure | None:
    """Target epsilon against accuracy per method and rank; the non-private result as a reference."""
    private = [s for s in settings if s.private and s.epsilon is not None]
    if not private:
        return None
    fig = _figure()
    ax = fig.subplots()
    styles = _styles(settings, lambda s: s.variant)
    for variant in dict.fromkeys(s.variant for s in private):
        mine = sorted((s for s in private if s.variant == variant), key=lambda s: s.epsilon)
        color, marker = mine[0].style
        stats = [s.stat(metric) for s in mine]
        container = ax.errorbar([s.epsilon for s in mine], [m for m, _, _ in stats],
                                yerr=[[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]],
                                fmt=marker, linestyle=styles[variant], color=color, markersize=6, capsize=3,
                                label=f"{variant}, DP")
        container.lines[0].set_gid("series")
    for s in settings:
        if s.private:
            continue
        _reference_line(ax, *s.stat(metric), s.style[0], f"{s.variant}, no DP")
    epsilons = sorted({s.epsilon for s in private})
    ax.set_xscale("log")
    ax.set_xticks(epsilons)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    deltas = [d for s in private for d in s.values("delta")]
    delta = f"; δ ≤ {max(deltas):.0e}" if deltas else ""
    ax.set_xlabel(f"privacy budget ε per client, target (log scale{delta})")
    ax.set_ylabel(METRICS.get(metric, metric.replace("_", " ")), fontsize=9)
    ax.set_title(f"{FIGURE_TITLES['privacy_vs_utility']} ({_spread_note(settings)})", fontsize=10)
    ax.grid(True, alpha=0.3)
    _legend(ax, len(ax.get_legend_handles_labels()[0]))
    return fig


def _per_round(runs: Sequence[RunData], value: Callable[[dict[str, Any]], float | None]
               ) -> tuple[list[int], list[float], list[float], list[float]]:
    """Rounds every run has, and the mean, min and max of value(row) over runs."""
    by_run = [{r["round"]: value(r) for r in run.metrics} for run in runs]
    rounds = sorted(set.intersection(*(set(d) for d in by_run))) if by_run else []
    mean, lo, hi = [], [], []
    for rnd in rounds:
        v = [d[rnd] for d in by_run if d[rnd] is not None]
        mean.append(sum(v) / len(v) if v else math.nan)
        lo.append(min(v) if v else math.nan)
        hi.append(max(v) if v else math.nan)
    return rounds, mean, lo, hi


def _round_figure(settings: Sequence[Setting], value: Callable[[dict[str, Any]], float | None],
                  ylabel: str, title: str, log_y: bool = False) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    styles = _styles(settings, lambda s: s.label)
    all_rounds: set[int] = set()
    all_values: list[float] = []
    for s in settings:
        rounds, mean, lo, hi = _per_round(s.runs, value)
        all_rounds.update(r["round"] for run in s.runs for r in run.metrics)
        all_values += [v for v in lo + hi if v is not None and not math.isnan(v)]
        color, marker = s.style
        ax.plot(rounds, mean, color=color, marker=marker, markersize=4, linestyle=styles[s.label],
                label=s.label, gid="series")
        if len(s.runs) > 1:
            ax.fill_between(rounds, lo, hi, color=color, alpha=0.15, linewidth=0, gid="spread")
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel(ylabel)
    _round_ticks(ax, sorted(all_rounds))
    if log_y:
        ax.set_yscale("log")
        _log_bytes_axis(ax.yaxis, all_values)
    ax.set_title(f"{title} ({_spread_note(settings)})", fontsize=10)
    ax.grid(True, alpha=0.3)
    _legend(ax, len(settings))
    return fig


def accuracy_vs_round(settings: Sequence[Setting]) -> Figure:
    """Validation accuracy per round (what selects a run's round), one line per setting."""
    return _round_figure(settings, lambda r: r.get("val_accuracy"), "validation accuracy",
                         FIGURE_TITLES["accuracy_vs_round"])


def bytes_vs_round(settings: Sequence[Setting]) -> Figure:
    """Cumulative bytes (up + down, all clients) per round, log scale; one line per setting."""
    def cumulative(row: dict[str, Any]) -> float | None:
        total = (row.get("cum_bytes_up") or 0) + (row.get("cum_bytes_down") or 0)
        return total if total > 0 else None  # nothing sent yet: no point on a log axis

    return _round_figure(settings, cumulative, "cumulative bytes, up + down, all clients (log scale)",
                         FIGURE_TITLES["bytes_vs_round"], log_y=True)


def bytes_by_component(panels: Sequence[tuple[str, RunData]]) -> Figure:
    """Per panel (one run), bytes per round by component, stacked; download left, upload right (hatched)."""
    ncols = min(4, max(1, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    width = max(6.5, 3.7 * ncols + 1.2)
    fig = _figure(width, 2.9 * nrows + 0.9)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    present: set[str] = set()
    for ax, (title, run) in zip(axes, panels, strict=False):
        totals: dict[tuple[int, str, str], int] = {}
        for row in run.comm:
            k = (row["round"], row["direction"], row["component"])
            totals[k] = totals.get(k, 0) + row["bytes"]
        rounds = sorted({k[0] for k in totals})
        for direction, offset, hatch in (("down", -0.2, None), ("up", 0.2, "///")):
            bottom = [0] * len(rounds)
            for component in COMPONENTS:
                heights = [totals.get((rnd, direction, component), 0) for rnd in rounds]
                if not any(heights):
                    continue
                present.add(component)
                ax.bar([rnd + offset for rnd in rounds], heights, width=0.38, bottom=bottom, hatch=hatch,
                       color=COMPONENT_COLORS[component], edgecolor="0.25", linewidth=0.4,
                       label=f"{direction} {component}")
                bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("bytes (all clients)")
        ax.yaxis.set_major_formatter(EngFormatter(unit="B"))
        _round_ticks(ax, rounds)
        if rounds:  # room for the two half-width bars of the first and last rounds
            ax.set_xlim(rounds[0] - 0.7, rounds[-1] + 0.7)
        ax.tick_params(labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in axes[len(panels):]:
        fig.delaxes(ax)
    handles = [Patch(facecolor=COMPONENT_COLORS[c], edgecolor="0.25", label=c)
               for c in COMPONENTS if c in present]
    handles += [Patch(facecolor="white", edgecolor="0.25", label="download (left bar)"),
                Patch(facecolor="white", edgecolor="0.25", hatch="///", label="upload (right bar, hatched)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), int(width // 1.9)),
               fontsize=8, frameon=False)
    fig.suptitle(f"{FIGURE_TITLES['bytes_by_component']} (payload bytes; init = one-time)", fontsize=10)
    return fig


# --- a directory's figures and report ----------------------------------------------------------------

@dataclass
class PlotOutput:
    figures: dict[str, Figure]
    files: list[Path]
    report: Path


def component_panels(settings: Sequence[Setting]) -> list[tuple[str, RunData]]:
    """One run per method and rank (bytes do not depend on the seed or the budget): a non-private
    completed run where there is one."""
    chosen: dict[tuple[str, int], tuple[str, RunData]] = {}
    for s in sorted(settings, key=lambda s: s.private):
        k = (s.method, s.rank)
        if k not in chosen and s.runs:
            chosen[k] = (f"{s.method} r={s.rank}", s.runs[0])
    return list(chosen.values())


def sweep_figures(data: SweepData, metric: str = "test_accuracy") -> dict[str, Figure]:
    """The sweep's figures; with `tune`, comm_vs_accuracy per tuned group and the others at the
    chosen values only."""
    settings = data.chosen_settings()
    if not settings:
        return {}
    figures: dict[str, Figure | None] = {
        "comm_vs_accuracy": tuned_comm_vs_accuracy(data.tuned, metric) if data.tune
        else comm_vs_accuracy(settings, metric),
        "privacy_vs_utility": privacy_vs_utility(settings, metric),
        "accuracy_vs_round": accuracy_vs_round(settings),
        "bytes_vs_round": bytes_vs_round(settings),
        "bytes_by_component": bytes_by_component(component_panels(settings)),
    }
    return {name: fig for name, fig in figures.items() if fig is not None}

def run_figures(run: RunData) -> dict[str, Figure]:
    setting = run_setting(run)
    return {"accuracy_vs_round": accuracy_vs_round([setting]), "bytes_vs_round": bytes_vs_round([setting]),
            "bytes_by_component": bytes_by_component([(setting.label, run)])}


def save_figure(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1], metadata={"Date": None})  # no timestamp: the same data gives the same file
    return paths


def plot_dir(directory: str | Path, out: str | Path | None = None, metric: str = "test_accuracy"
             ) -> PlotOutput:
    """Figures (PNG + SVG) and report.md for a sweep directory (sweep.csv) or a run directory."""
    directory = Path(directory)
    out_dir = Path(out) if out is not None else directory / "report"
    if (directory / "sweep.csv").is_file():
        data = load_sweep_dir(directory)
        figures = sweep_figures(data, metric)
        report = sweep_report(data, figures, metric)
    elif (directory / "metrics.jsonl").is_file():
        run = load_run(directory)
        figures = run_figures(run)
        report = run_report(run, figures)
    else:
        raise FileNotFoundError(f"{directory}: neither a sweep directory (sweep.csv) nor a run directory "
                                "(metrics.jsonl)")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [p for name, fig in figures.items() for p in save_figure(fig, out_dir, name)]
    report_path = out_dir / "report.md"
    report_path.write_text(report)
    return PlotOutput(figures, files, report_path)


# --- report.md -----------------------------------------------------------------------------------------

def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _stat_text(stat: tuple[float, float, float], digits: int = 3) -> str:
    mean, lo, hi = stat
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if hi == lo else f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


FIGURE_CAPTIONS = {
    "comm_vs_accuracy": "Total payload bytes of a run (upload + download, all clients, one-time init "
                        "included; log scale) against test accuracy. The dashed step line is the Pareto "
                        "frontier: no other setting is both cheaper and more accurate. Dotted horizontal "
                        "lines: centralised runs (all data in one client), a reference, not federated.",
    "privacy_vs_utility": "Target epsilon per client against test accuracy, per method and rank; dotted "
                          "lines: the same method and rank without DP.",
    "accuracy_vs_round": "Accuracy on the validation split after each round (round 0: before training); "
                         "the best round is the one whose test accuracy is reported.",
    "bytes_vs_round": "Cumulative payload bytes (upload + download, all clients) after each round.",
    "bytes_by_component": "Payload bytes per round by component, all clients; left bar download, right bar "
                          "(hatched) upload. One run per method and rank.",
}
TUNED_CAPTIONS = {
    "comm_vs_accuracy": "One marker per setting at its value chosen on validation: mean total payload bytes "
                        "(upload + download, all clients, one-time init included; log scale) against mean "
                        "test accuracy; error bars: ± one sample standard deviation over seeds. The dashed "
                        "step line is the Pareto frontier over the federated settings. Dotted horizontal "
                        "lines: centralised runs (all data in one client; band ± std), a reference, not "
                        "federated.",
}


def _figure_section(figures: Mapping[str, Figure],
                    captions: Mapping[str, str] = FIGURE_CAPTIONS) -> list[str]:
    out = ["## Figures", ""]
    for name in figures:
        out += [f"### {FIGURE_TITLES[name]}", "", f"![{FIGURE_TITLES[name]}]({name}.png)", "",
                captions[name] + f" Vector version: [{name}.svg]({name}.svg).", ""]
    return out


def tuned_section(groups: Sequence[TunedGroup]) -> list[str]:
    """report.md's first section for a tuned sweep: each group at its chosen value, and every value tried."""
    if not groups:
        return []
    tune = groups[0].tune_key
    rows = []
    for g in groups:
        failed = g.chosen.failed if g.chosen else 0
        rows.append([g.label, g.chosen.value if g.chosen else "–", f"{g.seeds}" + (f" ({failed} failed)"
                     if failed else ""), _fmt(g.val_accuracy.mean), mean_std_text(g.test_accuracy),
                     mean_std_text(g.final_test_accuracy), human_bytes(g.bytes_up.mean),
                     human_bytes(g.bytes_down.mean), human_bytes(g.bytes_total.mean)])
    header = ["setting", f"chosen {tune}", "seeds", "val accuracy (mean)", "test accuracy (mean ± std)",
              "final-round test accuracy (mean ± std)", "bytes up", "bytes down", "bytes total"]
    seeds = groups[0].select_seeds
    over = (f"on seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (every value ran there; "
            "the chosen one on every seed)") if seeds else "over its completed seeds"
    out = [f"## Tuned: `{tune}` chosen per setting on validation accuracy", "",
           f"Per setting (the grid less `{tune}` and the seed), the value of `{tune}` with the highest "
           f"mean best validation accuracy {over} (ties: the first in grid order); the "
           "test split never takes part in the choice. Test accuracy: the test split at each run's best "
           "validation round (the result); final-round: after the last round. Mean ± sample standard "
           "deviation over the completed seeds. Centralised settings pool every client's data in one "
           "client: a reference, not a federated result.", "", _table(header, rows), "",
           f"Every value tried (`{tune}` → the validation accuracy that chose, completed seeds; chosen in "
           "bold):", ""]
    for g in groups:
        tried = [f"{c.value} → {_fmt(c.val_mean)} ({c.seeds})" for c in g.candidates]
        tried = [f"**{t}**" if g.chosen and c.value == g.chosen.value else t
                 for t, c in zip(tried, g.candidates, strict=True)]
        out.append(f"- {g.label}: {', '.join(tried)}")
    return [*out, ""]


def sweep_report(data: SweepData, figures: Mapping[str, Figure], metric: str = "test_accuracy") -> str:
    """report.md of a sweep: (tuned: the tuned table first) a table per setting, the Pareto frontier,
    failed cells, the figures."""
    pin = _read_pin(data.path)
    completed = len(data.rows) - len(data.failed)
    out = [f"# Sweep report: {data.path.name}", "", *tuned_section(data.tuned),
           f"Sweep directory `{data.path}`" + (f"; base config `{pin['base']}`" if "base" in pin else "")
           + (f"; shared overrides `{json.dumps(pin['set'])}`" if pin.get("set") else "") + ".",
           f"Grid keys: {', '.join(f'`{c}`' for c in data.columns) or 'none'}. "
           f"{len(data.rows)} cells in sweep.csv: {completed} completed, {len(data.failed)} failed.", "",
           "Each run evaluates every round on a validation split; test accuracy is the test split at the "
           "round with the best validation accuracy, final-round test accuracy the test split after the last "
           "round. Bytes are payload bytes (float32 elements x 4) over the whole run, all clients, "
           "one-time init included. ε spent is the largest epsilon any client spent (as the run reports it). "
           f"{_spread_note(data.settings).capitalize()}.", ""]
    if data.settings:
        rows = []
        for s in data.settings:
            epsilon = s.stat("epsilon_max")
            rows.append([s.label, len(s.rows), _stat_text(s.stat("test_accuracy")),
                         _stat_text(s.stat("final_test_accuracy")), _stat_text(s.stat("best_val_accuracy")),
                         human_bytes(s.stat("bytes_up")[0]), human_bytes(s.stat("bytes_down")[0]),
                         human_bytes(s.stat("bytes_total")[0]),
                         "–" if math.isnan(epsilon[0]) else f"{epsilon[2]:.2f}",
                         f"{s.stat('elapsed_s')[0]:.0f}"])
        header = ["setting", "seeds", "test accuracy", "final-round test accuracy", "best val accuracy",
                  "bytes up", "bytes down", "bytes total", "ε spent (max)", "run time s"]
        out += ["## Results" + (" (every value tried)" if data.tune else ""), "", _table(header, rows), ""]
        out += _frontier_section(data, metric)
    else:
        out += ["No completed cells yet: nothing to plot.", ""]
    if data.failed:
        out += ["## Failed cells", "", "Run the sweep again to retry them (completed cells are skipped).", "",
                _table(["cell", "status", "error"],
                       [[r["cell"], r["status"], r["error"]] for r in data.failed]), ""]
    out += _figure_section(figures, {**FIGURE_CAPTIONS, **TUNED_CAPTIONS} if data.tune else FIGURE_CAPTIONS)
    return "\n".join(out).rstrip() + "\n"


def _frontier_section(data: SweepData, metric: str) -> list[str]:
    """The Pareto frontier of the comm figure (federated settings only; tuned: the tuned groups)."""
    if data.tune:
        groups = [g for g in data.tuned if not g.centralised and g.chosen is not None]
        labels = [f"{g.label} {_short_key(g.tune_key)}={g.chosen.value}" for g in groups if g.chosen]
        points = [(_nan(g.bytes_total.mean), _nan(_group_stat(g, metric).mean)) for g in groups]
    else:
        federated = [s for s in data.settings if not s.centralised]
        labels = [s.label for s in federated]
        points = [(s.stat("bytes_total")[0], s.stat(metric)[0]) for s in federated]
    out = [f"## Pareto frontier (fewest bytes for the {METRICS.get(metric, metric)}; federated settings)", ""]
    out += [f"{n}. {labels[i]}: {human_bytes(points[i][0])}, {points[i][1]:.3f}"
            for n, i in enumerate(pareto_frontier(points), start=1)]
    return [*out, ""]


def run_report(run: RunData, figures: Mapping[str, Figure]) -> str:
    """report.md of one run: the summary and a row per round."""
    s = run.summary
    comm = s.get("communication") or {}
    up, down = (comm.get("up") or {}).get("bytes", 0), (comm.get("down") or {}).get("bytes", 0)
    privacy = s.get("privacy") or {}
    out = [f"# Run report: {run.path.name}", "",
           _table(["method", "rank", "lr", "seed", "clients", "rounds", "test accuracy",
                   "best val accuracy (round)", "final-round test accuracy", "bytes up", "bytes down",
                   "ε spent (max)", "wall s"],
                  [[s.get("method", "?"), s.get("rank", "?"), s.get("lr", "?"), s.get("seed", "?"),
                    s.get("num_clients", "?"), s.get("rounds", "?"), _fmt(s.get("test_accuracy")),
                    f"{_fmt(s.get('best_val_accuracy'))} ({s.get('best_round', '?')})",
                    _fmt(s.get("final_test_accuracy")), human_bytes(up), human_bytes(down),
                    _fmt(privacy.get("epsilon_max"), 2) if privacy.get("enabled") else "not private",
                    _fmt(s.get("wall_s"), 0)]]), "",
           "Test accuracy is the test split at the round with the best validation accuracy; final-round test "
           "accuracy the test split after the last round.", ""]
    if s.get("centralised"):
        out += [f"This run is centralised: every client's data in one client "
                f"({run_setting(run).label}), a reference, not a federated result.", ""]
    if s.get("oracle"):
        out += ["This run used the pooled-data LoRA-SB init (the Fed-SB paper's oracle): not a federated "
                "result.", ""]
    out += ["## Rounds", "",
            _table(["round", "val accuracy", "val loss", "bytes up", "bytes down", "cumulative up",
                    "cumulative down"],
                   [[r["round"], _fmt(r.get("val_accuracy")), _fmt(r.get("val_loss")),
                     f"{r.get('bytes_up', 0):,}", f"{r.get('bytes_down', 0):,}",
                     f"{r.get('cum_bytes_up', 0):,}", f"{r.get('cum_bytes_down', 0):,}"]
                    for r in run.metrics]), ""]
    out += _figure_section(figures)
    return "\n".join(out).rstrip() + "\n"


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


# --- the CLI ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`fedsb plot` arguments."""
    parser.add_argument("dir", type=Path, help="a sweep directory (with sweep.csv) or a run directory")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where the figures and report.md go (default: DIR/report)")
    parser.add_argument("--metric", choices=tuple(METRICS), default="test_accuracy",
                        help="the accuracy of the sweep figures and the frontier: the test split at the best "
                             "validation round, or after the last round (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """`fedsb plot`: write the figures and report.md; print where they are."""
    output = plot_dir(args.dir, args.out, args.metric)
    for path in output.files:
        print(path)
    print(output.report)
    return 0
