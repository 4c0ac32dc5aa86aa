"""comm_vs_accuracy: total bytes of a run against its accuracy, and the Pareto frontier.

Total bytes (up + down, all clients, one-time init included; log scale) against test accuracy; one
marker per setting (method and rank, and whatever else the grid varies), colour and marker shape per
method; the Pareto frontier (fewest bytes for the accuracy) drawn as a step line. A centralised run
(every client's data in one client: federation.centralised) is a labelled horizontal reference
line, never a marker or on the frontier. A tuned sweep has one marker per group at its chosen value
(tuned_comm_vs_accuracy), with error bars of the 95% confidence interval over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from fedsb.analysis.plots.data import Setting
from fedsb.analysis.plots.style import (
    FIGURE_TITLES,
    METRICS,
    legend,
    log_bytes_axis,
    method_style,
    new_figure,
    reference_line,
    spread_note,
)
from fedsb.analysis.sweep.tuning import Stat, TunedGroup


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


def _frontier_line(ax: Any, points: Sequence[tuple[float, float]]) -> None:
    frontier = pareto_frontier(points)
    if frontier:
        ax.plot([points[i][0] for i in frontier], [points[i][1] for i in frontier], drawstyle="steps-post",
                color="0.35", linestyle="--", linewidth=1.2, zorder=1, gid="frontier",
                label="Pareto frontier")


def _comm_axes(ax: Any, bytes_values: Sequence[float], metric: str, note: str) -> None:
    ax.set_xscale("log")
    log_bytes_axis(ax.xaxis, bytes_values)
    ax.set_xlabel("total communication per run: upload + download, all clients, incl. one-time init "
                  "(bytes, log scale)", fontsize=9)
    ax.set_ylabel(METRICS.get(metric, metric.replace("_", " ")), fontsize=9)
    ax.set_title(f"{FIGURE_TITLES['comm_vs_accuracy']} ({note})", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    legend(ax, len(ax.get_legend_handles_labels()[0]))


def comm_vs_accuracy(settings: Sequence[Setting], metric: str = "test_accuracy") -> Figure:
    """Total bytes (log x) against accuracy: one marker per federated setting (bars: min to max over
    seeds) and the Pareto frontier over them; a centralised setting is a horizontal reference line."""
    fig = new_figure()
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
                                markersize=7, capsize=3, label=federated[mine[0]].method_label)
        container.lines[0].set_gid("series")
        for i in mine:  # the rest of the label (the colour and marker already say the method)
            tag = federated[i].label.removeprefix(federated[i].method).strip()
            ax.annotate(tag, points[i], xytext=(5, 4), textcoords="offset points", fontsize=7, color="0.25")
    _frontier_line(ax, points)
    for s in settings:
        if s.centralised:
            reference_line(ax, *s.stat(metric), s.style[0], s.label)
    _comm_axes(ax, [x for x, _ in points], metric, spread_note(settings))
    return fig


def tuned_comm_vs_accuracy(groups: Sequence[TunedGroup], metric: str = "test_accuracy") -> Figure:
    """A tuned sweep: one marker per federated group at its chosen value, at (mean total bytes, mean
    accuracy) with error bars of the 95% CI over seeds; the Pareto frontier over these groups;
    each centralised group a horizontal reference line (band: its 95% CI)."""
    fig = new_figure()
    ax = fig.subplots()
    chosen = [g for g in groups if g.chosen is not None and group_stat(g, metric).mean is not None]
    federated = [g for g in chosen if not g.centralised]
    points = [(nan_if_none(g.bytes_total.mean), nan_if_none(group_stat(g, metric).mean)) for g in federated]
    for method in dict.fromkeys(g.method for g in federated):
        mine = sorted((i for i, g in enumerate(federated) if g.method == method), key=lambda i: points[i][0])
        color, marker = method_style(method)
        container = ax.errorbar([points[i][0] for i in mine], [points[i][1] for i in mine],
                                yerr=[spread(federated[i], metric) for i in mine], fmt=marker,
                                linestyle="none", color=color, markersize=7, capsize=3,
                                label=federated[mine[0]].method_label)
        container.lines[0].set_gid("series")
        for i in mine:
            ax.annotate(_tuned_tag(federated[i]), points[i], xytext=(5, 4), textcoords="offset points",
                        fontsize=7, color="0.25")
    _frontier_line(ax, points)
    for g in chosen:
        if g.centralised:
            mean, half = nan_if_none(group_stat(g, metric).mean), spread(g, metric)
            reference_line(ax, mean, mean - half, mean + half, method_style(g.method)[0],
                           f"{g.label}, {short_key(g.tune_key)}={g.chosen.value if g.chosen else '?'}")
    _comm_axes(ax, [x for x, _ in points], metric, _tuned_note(groups))
    return fig


def spread(group: TunedGroup, metric: str) -> float:
    """An error bar's half length: the 95% confidence interval's half width over seeds for the test
    accuracies (one std for another metric); 0 with one seed."""
    intervals = {"test_accuracy": group.test_interval, "final_test_accuracy": group.final_test_interval}
    interval = intervals.get(metric)
    if interval is not None:
        return interval.half_width
    return group_stat(group, metric).std or 0.0


def group_stat(group: TunedGroup, metric: str) -> Stat:
    """The group's mean and std of `metric` (one of METRICS) over its seeds."""
    if metric not in METRICS:
        raise ValueError(f"metric: got {metric!r}; accepted: {', '.join(METRICS)}")
    return getattr(group, metric)


def nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def short_key(key: str) -> str:
    return key.rsplit(".", 1)[-1]  # train.lr -> lr


def _tuned_tag(group: TunedGroup) -> str:
    """A marker's annotation: the label less the method (the colour and marker say it), and the value."""
    rest = group.label.removeprefix(group.method).strip()
    return f"{rest} {short_key(group.tune_key)}={group.chosen.value if group.chosen else '?'}".strip()


def _tuned_note(groups: Sequence[TunedGroup]) -> str:
    seeds = max((g.seeds for g in groups), default=0)
    tune = groups[0].tune_key if groups else "the tuned key"
    note = f"mean and 95% CI over up to {seeds} seeds" if seeds > 1 else "one seed per setting"
    return f"{tune} chosen on validation; {note}"

