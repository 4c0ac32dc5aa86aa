"""privacy_vs_utility: the target epsilon against test accuracy.

One line per method and rank, the non-private result of the same method and rank as a dotted
horizontal reference line. Drawn for sweeps with at least one private run (a run whose summary.json
privacy is not enabled, or whose status says "not private", is not private, whatever its config
asked for).
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from fedsb.analysis.plots.data import Setting
from fedsb.analysis.plots.style import (
    FIGURE_TITLES,
    METRICS,
    legend,
    line_styles,
    new_figure,
    reference_line,
    spread_note,
)


def privacy_vs_utility(settings: Sequence[Setting], metric: str = "test_accuracy") -> Figure | None:
    """Target epsilon against accuracy per method and rank; the non-private result as a reference."""
    private = [s for s in settings if s.private and s.epsilon is not None]
    if not private:
        return None
    fig = new_figure()
    ax = fig.subplots()
    styles = line_styles(settings, lambda s: s.variant)
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
        reference_line(ax, *s.stat(metric), s.style[0], f"{s.variant}, no DP")
    epsilons = sorted({s.epsilon for s in private})
    ax.set_xscale("log")
    ax.set_xticks(epsilons)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    deltas = [d for s in private for d in s.values("delta")]  # sweep.csv: privacy.delta_max
    delta = f"; δ ≤ {max(deltas):.0e}" if deltas else ""
    ax.set_xlabel(f"privacy budget ε per client, target (log scale{delta})")
    ax.set_ylabel(METRICS.get(metric, metric.replace("_", " ")), fontsize=9)
    ax.set_title(f"{FIGURE_TITLES['privacy_vs_utility']} ({spread_note(settings)})", fontsize=10)
    ax.grid(True, alpha=0.3)
    legend(ax, len(ax.get_legend_handles_labels()[0]))
    return fig
