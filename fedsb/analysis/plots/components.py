"""bytes_by_component: payload bytes per round by component (lora_A, lora_B, lora_R, residual, head,
init), stacked; download and upload side by side. One panel per method and rank (from comm.csv)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter

from fedsb.analysis.plots.data import RunData, Setting
from fedsb.analysis.plots.style import COMPONENT_COLORS, FIGURE_TITLES, new_figure, round_ticks
from fedsb.analysis.sweep.table import COMPONENTS


def component_panels(settings: Sequence[Setting]) -> list[tuple[str, RunData]]:
    """One run per method and rank (bytes do not depend on the seed or the budget): a non-private
    completed run where there is one."""
    chosen: dict[tuple[str, int], tuple[str, RunData]] = {}
    for s in sorted(settings, key=lambda s: s.private):
        k = (s.method, s.rank)
        if k not in chosen and s.runs:
            chosen[k] = (f"{s.method} r={s.rank}", s.runs[0])
    return list(chosen.values())


def bytes_by_component(panels: Sequence[tuple[str, RunData]]) -> Figure:
    """Per panel (one run), bytes per round by component, stacked; download left, upload right (hatched)."""
    ncols = min(4, max(1, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    width = max(6.5, 3.7 * ncols + 1.2)
    fig = new_figure(width, 2.9 * nrows + 0.9)
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
        round_ticks(ax, rounds)
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

