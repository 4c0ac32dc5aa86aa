"""report.md: for a sweep (the tuned table first, when tuned; a table per setting; the Pareto frontier;
failed cells; the figures with captions) or for one run (its summary and a row per round)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from fedsb.analysis.plots.comm import group_stat, nan_if_none, pareto_frontier, short_key
from fedsb.analysis.plots.data import RunData, SweepData, run_setting
from fedsb.analysis.plots.style import FIGURE_TITLES, METRICS, spread_note
from fedsb.analysis.sweep.compare import MARGIN, PairedDifference, context_of, matches
from fedsb.analysis.sweep.report import human_bytes, mean_std_text
from fedsb.analysis.sweep.stats import interval_text
from fedsb.analysis.sweep.tuning import TunedGroup


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
                        "test accuracy; error bars: the 95% confidence interval over seeds (Student's "
                        "t). The dashed step line is the Pareto frontier over the federated settings. "
                        "Dotted horizontal lines: centralised runs (all data in one client; band: 95% "
                        "CI), a reference, not federated.",
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
    # Clients of different ranks: the chosen adapters truncated to each rank, a column per rank.
    ranks = sorted({r for g in groups for r in g.test_accuracy_at_rank}, key=int)
    rows = []
    for g in groups:
        failed = g.chosen.failed if g.chosen else 0
        rows.append([g.label, g.chosen.value if g.chosen else "–", f"{g.seeds}" + (f" ({failed} failed)"
                     if failed else ""), _fmt(g.val_accuracy.mean), interval_text(g.test_interval),
                     *(mean_std_text(g.test_accuracy_at_rank[r]) if r in g.test_accuracy_at_rank else "–"
                       for r in ranks),
                     interval_text(g.final_test_interval), human_bytes(g.bytes_up.mean),
                     human_bytes(g.bytes_down.mean), human_bytes(g.bytes_total.mean)])
    header = ["setting", f"chosen {tune}", "seeds", "val accuracy (mean)", "test accuracy (mean [95% CI])",
              *(f"truncated to rank {r}" for r in ranks),
              "final-round test accuracy (mean [95% CI])", "bytes up", "bytes down", "bytes total"]
    seeds = groups[0].select_seeds
    over = (f"on seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (every value ran there; "
            "the chosen one on every seed)") if seeds else "over its completed seeds"
    out = [f"## Tuned: `{tune}` chosen per setting on validation accuracy", "",
           f"Per setting (the grid less `{tune}` and the seed), the value of `{tune}` with the highest "
           f"mean best validation accuracy {over} (ties: the first in grid order); the "
           "test split never takes part in the choice. Test accuracy: the test split at each run's best "
           "validation round (the result); final-round: after the last round. Mean and 95% confidence "
           "interval (Student's t) over the completed seeds. Centralised settings pool every client's "
           "data in one client: a reference, not a federated result.", "", _table(header, rows), "",
           f"Every value tried (`{tune}` → the validation accuracy that chose, completed seeds; chosen in "
           "bold):", ""]
    for g in groups:
        tried = [f"{c.value} → {_fmt(c.val_mean)} ({c.seeds})" for c in g.candidates]
        tried = [f"**{t}**" if g.chosen and c.value == g.chosen.value else t
                 for t, c in zip(tried, g.candidates, strict=True)]
        out.append(f"- {g.label}: {', '.join(tried)}")
    return [*out, ""]


def paired_section(pairs: Sequence[PairedDifference]) -> list[str]:
    """The paired differences over seeds and what each decides (fedsb.analysis.sweep.compare)."""
    if not pairs:
        return []
    rows = [[p.context or "–", p.a.label, p.b.label, len(p.seeds), interval_text(p.interval, signed=True),
             p.more_accurate, p.reaches, "–" if p.bytes_ratio is None else f"{p.bytes_ratio:.3f}"]
            for p in pairs]
    header = ["context", "a", "b", "paired seeds", "a − b (mean [95% CI])", "a more accurate than b",
              f"a reaches b (within {MARGIN})", "bytes total a / b"]
    return ["## Paired differences over seeds", "",
            "Each setting at its chosen value; a − b is the mean over the seeds both completed of the "
            "difference in test accuracy on the same seed (the same data subsample, partition, cohorts and "
            "init), with its 95% confidence interval. *a more accurate than b*: **holds** when the interval "
            "is above 0, **does not hold** when it is below 0, **undecided** when it contains 0. *a reaches "
            f"b*: the same against −{MARGIN} (a is not worse than b by more than {MARGIN}).", "",
            _table(header, rows), ""]


def communication_section(data: SweepData) -> list[str]:
    """Per tuned setting: the one-time bytes, the bytes of every later round and the run's total, from
    its first chosen run's metrics; and, against the compared setting of its context, the round from
    which the compared setting is cheaper in total (its one-time tensors paid off)."""
    costs = [(g, cost) for g in data.tuned if not g.centralised and (cost := _round_cost(data, g))]
    if not costs:
        return []
    compare = data.pin.get("compare") or {}
    focus = {context_of(g, list(compare)): (g, c) for g, c in costs if compare and matches(g, compare)}
    rows = []
    for g, (one_time, per_round, rounds) in costs:
        ref = focus.get(context_of(g, list(compare)))
        cross = "–" if ref is None or ref[0] is g else \
            f"{ref[0].label}: {crossover_text(ref[1][:2], (one_time, per_round))}"
        rows.append([g.label, human_bytes(per_round), human_bytes(one_time),
                     human_bytes(one_time + rounds * per_round), rounds, cross])
    return ["## Communication: per round, one-time, and when a total falls below another's", "",
            "Payload bytes, upload + download, all clients (from each setting's first chosen run). *Per "
            "round*: a round after every client has its one-time tensors; *one-time*: what the first "
            "round adds (e.g. Fed-SB's frozen B and A, FFA-LoRA's frozen A); total = one-time + rounds x "
            "per round. The last column: from which round on the compared setting's total is below this "
            "setting's.", "",
            _table(["setting", "per round", "one-time", "total", "rounds",
                    "compared setting cheaper in total"], rows), ""]


def _round_cost(data: SweepData, group: TunedGroup) -> tuple[float, float, int] | None:
    """(one-time bytes, bytes per later round, rounds) of the group's first chosen run (at least 2 rounds)."""
    cells = set(group.cells)
    for setting in data.settings:
        for row, run in zip(setting.rows, setting.runs, strict=False):
            trained = [r.bytes_up + r.bytes_down for r in run.metrics if r.round > 0]
            if row["cell"] in cells and len(trained) > 1:
                per_round = float(trained[-1])
                return sum(trained) - len(trained) * per_round, per_round, len(trained)
    return None


def crossover_text(cheap: tuple[float, float], other: tuple[float, float]) -> str:
    """From which round `cheap` (one-time, per round) totals less than `other`: 'from round 3', or
    'never' (it costs as much or more every round)."""
    rounds = crossover_round(cheap, other)
    return "never" if rounds is None else f"from round {rounds}"


def crossover_round(cheap: tuple[float, float], other: tuple[float, float]) -> int | None:
    """The smallest R >= 1 with one_a + R per_a < one_b + R per_b; None if there is none."""
    (one_a, per_a), (one_b, per_b) = cheap, other
    if per_a >= per_b:
        return 1 if one_a + per_a < one_b + per_b else None
    return max(1, math.floor((one_a - one_b) / (per_b - per_a)) + 1)


def sweep_report(data: SweepData, figures: Mapping[str, Figure], metric: str = "test_accuracy") -> str:
    """report.md of a sweep: (tuned: the tuned table first) a table per setting, the Pareto frontier,
    failed cells, the figures."""
    pin = data.pin
    completed = len(data.rows) - len(data.failed)
    out = [f"# Sweep report: {data.path.name}", "", *tuned_section(data.tuned), *paired_section(data.pairs),
           *communication_section(data),
           f"Sweep directory `{data.path.name}`"
           + (f"; base config `{pin['base']}` (from the sweep directory)" if "base" in pin else "")
           + (f"; shared overrides `{json.dumps(pin['set'])}`" if pin.get("set") else "") + ".",
           f"Grid keys: {', '.join(f'`{c}`' for c in data.columns) or 'none'}. "
           f"{len(data.rows)} cells in sweep.csv: {completed} completed, {len(data.failed)} failed.", "",
           "Each run evaluates every round on a validation split; test accuracy is the test split at the "
           "round with the best validation accuracy, final-round test accuracy the test split after the last "
           "round. Bytes are payload bytes (float32 elements x 4) over the whole run, all clients, "
           "one-time init included. ε spent is the largest epsilon any client spent (as the run reports it). "
           f"{spread_note(data.settings).capitalize()}.", ""]
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
        labels = [f"{g.label} {short_key(g.tune_key)}={g.chosen.value}" for g in groups if g.chosen]
        points = [(nan_if_none(g.bytes_total.mean), nan_if_none(group_stat(g, metric).mean)) for g in groups]
    else:
        federated = [s for s in data.settings if not s.centralised]
        labels = [s.label for s in federated]
        points = [(s.stat("bytes_total")[0], s.stat(metric)[0]) for s in federated]
    out = [f"## Pareto frontier (fewest bytes for the {METRICS.get(metric, metric)}; federated settings)", ""]
    out += [f"{n}. {labels[i]}: {human_bytes(points[i][0])}, {points[i][1]:.3f}"
            for n, i in enumerate(pareto_frontier(points), start=1)]
    return [*out, ""]


def run_report(run: RunData, figures: Mapping[str, Figure]) -> str:
    """report.md of one run: the summary (if the run has finished) and a row per round."""
    s = run.summary
    out = [f"# Run report: {run.path.name}", ""]
    if s is None:
        out += ["No summary.json yet: the run has not finished (or failed before its summary).", ""]
    else:
        out += [_table(["method", "rank", "lr", "seed", "clients", "rounds", "test accuracy",
                        "best val accuracy (round)", "final-round test accuracy", "bytes up", "bytes down",
                        "ε spent (max)", "wall s"],
                       [[s.method, s.rank, s.lr, s.seed, s.num_clients, s.rounds, _fmt(s.test_accuracy),
                         f"{_fmt(s.best_val_accuracy)} ({'?' if s.best_round is None else s.best_round})",
                         _fmt(s.final_test_accuracy), human_bytes(s.bytes_total("up")),
                         human_bytes(s.bytes_total("down")),
                         _fmt(s.privacy.epsilon_max, 2) if s.privacy.enabled else "not private",
                         _fmt(s.wall_s, 0)]]), "",
                "Test accuracy is the test split at the round with the best validation accuracy; final-round "
                "test accuracy the test split after the last round.", ""]
        if s.centralised:
            out += [f"This run is centralised: every client's data in one client "
                    f"({run_setting(run).label}), a reference, not a federated result.", ""]
        if s.oracle:
            out += ["This run's init used every client's pooled data (an oracle, as in the Fed-SB paper): "
                    "not a federated result.", ""]
    out += ["## Rounds", "",
            _table(["round", "val accuracy", "val loss", "bytes up", "bytes down", "cumulative up",
                    "cumulative down"],
                   [[r.round, _fmt(r.val_accuracy), _fmt(r.val_loss), f"{r.bytes_up:,}", f"{r.bytes_down:,}",
                     f"{r.cum_bytes_up:,}", f"{r.cum_bytes_down:,}"] for r in run.metrics]), ""]
    out += _figure_section(figures)
    return "\n".join(out).rstrip() + "\n"


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"
