"""The figures' look: colours and markers per method, per component, line styles, titles, axes helpers.

Colours are the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies), and
every method also has its own marker shape, so colour alone never carries it. A method's colour and
marker come from its index in the method registry (`fedsb.methods.method_names()`), so they are the
same in every figure and no figure code names a method.

Every figure is a matplotlib Figure built without pyplot (nothing is kept in a global figure
registry and no display is needed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, NullFormatter

from fedsb.methods import method_names

if TYPE_CHECKING:
    from fedsb.analysis.plots.data import Setting

# Okabe & Ito (2008), "Color Universal Design": safe for the common colour-vision deficiencies.
OKABE_ITO = {"orange": "#E69F00", "sky_blue": "#56B4E9", "green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "black": "#000000"}
# The n-th registered method gets the n-th colour and marker (cycling past the end); black and "x"
# are left for a method the registry does not know (e.g. a plugin's, read back from an old sweep).
METHOD_COLORS = tuple(OKABE_ITO[c] for c in ("vermillion", "sky_blue", "purple", "blue", "orange", "green",
                                             "yellow"))
METHOD_MARKERS = ("s", "^", "D", "o", "v", "P", "X")
UNKNOWN_METHOD_STYLE = (OKABE_ITO["black"], "x")
COMPONENT_COLORS = {"lora_A": OKABE_ITO["orange"], "lora_B": OKABE_ITO["sky_blue"],
                    "lora_R": OKABE_ITO["green"], "residual": OKABE_ITO["purple"],
                    "bone_block": OKABE_ITO["vermillion"], "mora_M": OKABE_ITO["green"],
                    "head": OKABE_ITO["blue"], "init": OKABE_ITO["yellow"]}
LINESTYLES = ("-", "--", "-.", ":")
METRICS = {  # the accuracy of the sweep figures and the frontier (--metric), as an axis label
    "test_accuracy": "test accuracy (at the best validation round)",
    "final_test_accuracy": "final-round test accuracy",
}
FIGURE_TITLES = {
    "comm_vs_accuracy": "Communication vs accuracy",
    "privacy_vs_utility": "Privacy vs utility",
    "accuracy_vs_round": "Validation accuracy per round",
    "bytes_vs_round": "Cumulative bytes per round",
    "bytes_by_component": "Bytes per round by component",
}


def method_style(method: str) -> tuple[str, str]:
    """(colour, marker) of a method, by its position in the registry."""
    names = method_names()
    if method not in names:
        return UNKNOWN_METHOD_STYLE
    i = names.index(method)
    return METHOD_COLORS[i % len(METHOD_COLORS)], METHOD_MARKERS[i % len(METHOD_MARKERS)]


def new_figure(width: float = 7.0, height: float = 4.4) -> Figure:
    """A Figure on the Agg canvas (headless: PNG through Agg, SVG through its own backend)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def legend(ax: Any, n: int, **kwargs: Any) -> None:
    """Inside the axes (matplotlib's best place) when short, outside on the right when long."""
    if n > 6:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, **kwargs)
    else:
        ax.legend(fontsize=8, **kwargs)


def spread_note(settings: Sequence[Setting]) -> str:
    """What a marker and its bars stand for: '(mean over up to 3 seeds; bars/bands: min to max)'."""
    seeds = max((len(s.rows) for s in settings), default=1)
    return f"mean over up to {seeds} seeds; bars/bands: min to max" if seeds > 1 else "one seed per setting"


def line_styles(settings: Sequence[Setting], key: Callable[[Setting], str]) -> dict[str, str]:
    """A line style per distinct key within each method (the colour already names the method)."""
    styles: dict[str, str] = {}
    count: dict[str, int] = {}
    for s in settings:
        k = key(s)
        if k not in styles:
            styles[k] = LINESTYLES[count.get(s.method, 0) % len(LINESTYLES)]
            count[s.method] = count.get(s.method, 0) + 1
    return styles


def log_bytes_axis(axis: Any, values: Iterable[float]) -> None:
    """Bytes on a log axis in kB/MB/GB; minor ticks labelled too when the data span under a decade
    (otherwise such an axis would show no label, or matplotlib's 8x10^4 style)."""
    axis.set_major_formatter(EngFormatter(unit="B"))
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    narrow = bool(positive) and max(positive) / min(positive) < 10
    axis.set_minor_formatter(EngFormatter(unit="B") if narrow else NullFormatter())


def round_ticks(ax: Any, rounds: Sequence[int]) -> None:
    """Integer rounds on the x axis, however few (matplotlib would otherwise show 0.95, 1.0, ...)."""
    if not rounds:
        return
    ax.set_xticks(rounds if len(rounds) <= 12 else list(rounds)[::math.ceil(len(rounds) / 12)])
    ax.set_xlim(rounds[0] - 0.3, rounds[-1] + 0.3)


def reference_line(ax: Any, y: float, lo: float, hi: float, color: str, label: str) -> None:
    """A result drawn across the axes rather than as a point (no DP; the centralised run), its
    spread over seeds as a band."""
    ax.axhline(y, color=color, linestyle=":", linewidth=1.5, gid="reference", label=label)
    if hi > lo:
        ax.axhspan(lo, hi, color=color, alpha=0.08, gid="spread")
