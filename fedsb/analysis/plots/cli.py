"""`fedsb plot DIR`: a directory's figures (PNG and SVG) and report.md, and the subcommand's arguments."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from fedsb.analysis.plots.comm import comm_vs_accuracy, tuned_comm_vs_accuracy
from fedsb.analysis.plots.components import bytes_by_component, component_panels
from fedsb.analysis.plots.data import RunData, SweepData, load_run, load_sweep_dir, run_setting
from fedsb.analysis.plots.privacy import privacy_vs_utility
from fedsb.analysis.plots.report import run_report, sweep_report
from fedsb.analysis.plots.rounds import accuracy_vs_round, bytes_vs_round
from fedsb.analysis.plots.style import METRICS
from fedsb.analysis.sweep.table import SWEEP_CSV
from fedsb.experiment.summary import METRICS_FILE


@dataclass
class PlotOutput:
    figures: dict[str, Figure]
    files: list[Path]
    report: Path


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
    """One run's figures: its rounds and its bytes by component."""
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
    if (directory / SWEEP_CSV).is_file():
        data = load_sweep_dir(directory)
        figures = sweep_figures(data, metric)
        report = sweep_report(data, figures, metric)
    elif (directory / METRICS_FILE).is_file():
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
