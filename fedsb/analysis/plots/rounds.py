"""accuracy_vs_round and bytes_vs_round: validation accuracy and cumulative bytes (up + down) per round,
one line per setting (the mean over its seeds, a band from the minimum to the maximum)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from matplotlib.figure import Figure

from fedsb.analysis.plots.data import RunData, Setting
from fedsb.analysis.plots.style import (
    FIGURE_TITLES,
    legend,
    line_styles,
    log_bytes_axis,
    new_figure,
    round_ticks,
    spread_note,
)
from fedsb.experiment.summary import MetricsRow


def _per_round(runs: Sequence[RunData], value: Callable[[MetricsRow], float | None]
               ) -> tuple[list[int], list[float], list[float], list[float]]:
    """Rounds every run has, and the mean, min and max of value(row) over runs."""
    by_run = [{r.round: value(r) for r in run.metrics} for run in runs]
    rounds = sorted(set.intersection(*(set(d) for d in by_run))) if by_run else []
    mean, lo, hi = [], [], []
    for rnd in rounds:
        v = [d[rnd] for d in by_run if d[rnd] is not None]
        mean.append(sum(v) / len(v) if v else math.nan)
        lo.append(min(v) if v else math.nan)
        hi.append(max(v) if v else math.nan)
    return rounds, mean, lo, hi


def _round_figure(settings: Sequence[Setting], value: Callable[[MetricsRow], float | None],
                  ylabel: str, title: str, log_y: bool = False) -> Figure:
    fig = new_figure()
    ax = fig.subplots()
    styles = line_styles(settings, lambda s: s.label)
    all_rounds: set[int] = set()
    all_values: list[float] = []
    for s in settings:
        rounds, mean, lo, hi = _per_round(s.runs, value)
        all_rounds.update(r.round for run in s.runs for r in run.metrics)
        all_values += [v for v in lo + hi if v is not None and not math.isnan(v)]
        color, marker = s.style
        ax.plot(rounds, mean, color=color, marker=marker, markersize=4, linestyle=styles[s.label],
                label=s.label, gid="series")
        if len(s.runs) > 1:
            ax.fill_between(rounds, lo, hi, color=color, alpha=0.15, linewidth=0, gid="spread")
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel(ylabel)
    round_ticks(ax, sorted(all_rounds))
    if log_y:
        ax.set_yscale("log")
        log_bytes_axis(ax.yaxis, all_values)
    ax.set_title(f"{title} ({spread_note(settings)})", fontsize=10)
    ax.grid(True, alpha=0.3)
    legend(ax, len(settings))
    return fig


def accuracy_vs_round(settings: Sequence[Setting]) -> Figure:
    """Validation accuracy per round (what selects a run's round), one line per setting."""
    return _round_figure(settings, lambda r: r.val_accuracy, "validation accuracy",
                         FIGURE_TITLES["accuracy_vs_round"])


def bytes_vs_round(settings: Sequence[Setting]) -> Figure:
    """Cumulative bytes (up + down, all clients) per round, log scale; one line per setting."""
    def cumulative(row: MetricsRow) -> float | None:
        total = row.cum_bytes_up + row.cum_bytes_down
        return total if total > 0 else None  # nothing sent yet: no point on a log axis

    return _round_figure(settings, cumulative, "cumulative bytes, up + down, all clients (log scale)",
                         FIGURE_TITLES["bytes_vs_round"], log_y=True)
