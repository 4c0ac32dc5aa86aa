"""`fedsb plot`: figures and report.md from synthetic run and sweep directories (plain files, no
Flower). The figures are checked through their matplotlib artists: series, spreads, reference
lines, the Pareto frontier, scales."""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
from pathlib import Path

import pytest
import run_outputs
from matplotlib.container import BarContainer, ErrorbarContainer

from fedsb.analysis.plots import style
from fedsb.analysis.plots.cli import plot_dir
from fedsb.analysis.plots.comm import comm_vs_accuracy, pareto_frontier, tuned_comm_vs_accuracy
from fedsb.analysis.plots.components import bytes_by_component, component_panels
from fedsb.analysis.plots.data import load_sweep_dir
from fedsb.analysis.plots.privacy import privacy_vs_utility
from fedsb.analysis.plots.rounds import accuracy_vs_round, bytes_vs_round
from fedsb.analysis.sweep.outputs import result_fields
from fedsb.analysis.sweep.spec import format_value
from fedsb.analysis.sweep.table import COMPLETED, csv_header
from fedsb.experiment.summary import PrivacySummary
from fedsb.methods import method_names

METHODS = ("fedit", "ffa", "fedex", "fedsb")
ROUNDS = 2
# Payload bytes per round and rank unit, all clients: (direction, component) -> bytes.
PROFILES = {
    "fedit": {("up", "lora_A"): 300, ("up", "lora_B"): 200, ("up", "head"): 50,
              ("down", "lora_A"): 300, ("down", "lora_B"): 200, ("down", "head"): 50},
    "ffa": {("up", "lora_B"): 200, ("up", "head"): 50, ("down", "lora_B"): 200, ("down", "head"): 50},
    "fedex": {("up", "lora_A"): 300, ("up", "lora_B"): 200, ("up", "head"): 50, ("down", "lora_A"): 300,
              ("down", "lora_B"): 200, ("down", "head"): 50, ("down", "residual"): 90_000},
    "fedsb": {("up", "lora_R"): 4, ("up", "head"): 50, ("down", "lora_R"): 4, ("down", "head"): 50},
}
INIT = {"ffa": 3000, "fedsb": 40_000}  # one-time, downloaded in round 1


def comm_rows(method: str, rank: int) -> list[tuple[int, str, str, int]]:
    rows = []
    for rnd in range(1, ROUNDS + 1):
        for (direction, component), unit in PROFILES[method].items():
            rows.append((rnd, direction, component, unit * rank))
        if rnd == 1 and method in INIT:
            rows.append((rnd, "down", "init", INIT[method]))
    return rows


def make_run(run_dir: Path, method: str, rank: int, seed: int, accuracy: float, epsilon: float | None = None,
             reports_privacy: bool = True, oracle: bool = False, val_accuracy: float | None = None,
             lr: float = 0.005, centralised: bool = False) -> Path:
    """A run directory as the Flower app leaves it: summary.json, metrics.jsonl, comm.csv.

    `accuracy` is the test accuracy at the best validation round (the reported number); the best
    validation accuracy is `val_accuracy` (default accuracy + 0.05), reached at the last round; the
    final-round test accuracy is accuracy - 0.05. Three different numbers, so a figure reading the
    wrong one shows.
    """
    val_accuracy = accuracy + 0.05 if val_accuracy is None else val_accuracy
    run_dir.mkdir(parents=True)
    rows = comm_rows(method, rank)
    with open(run_dir / "comm.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", "client", "phase", "direction", "component", "params", "bytes",
                         "wire_bytes"])
        for rnd, direction, component, size in rows:
            writer.writerow([rnd, 0, "train", direction, component, size // 4, size, size + 200])
    communication = {}
    for d in ("up", "down"):
        by_component: dict[str, int] = {}
        for _, direction, component, size in rows:
            if direction == d:
                by_component[component] = by_component.get(component, 0) + size
        communication[d] = {"bytes": sum(by_component.values()), "wire_bytes": 0, "params": 0,
                            "bytes_by_component": by_component}
    cum_up = cum_down = 0
    metrics = [run_outputs.metrics_row(0, 0.25, 1.4)]
    for rnd in range(1, ROUNDS + 1):
        up = sum(s for r, d, _, s in rows if r == rnd and d == "up")
        down = sum(s for r, d, _, s in rows if r == rnd and d == "down")
        cum_up, cum_down = cum_up + up, cum_down + down
        metrics.append(run_outputs.metrics_row(rnd, 0.25 + (val_accuracy - 0.25) * rnd / ROUNDS, 1.0,
                                               bytes_up=up, bytes_down=down, cum_bytes_up=cum_up,
                                               cum_bytes_down=cum_down))
    private = None
    if epsilon is not None and reports_privacy:  # as fedsb.experiment.report.privacy_summary writes it
        private = PrivacySummary(enabled=True, status="private", target_epsilon=epsilon,
                                 epsilon_max=epsilon * 0.98, delta_max=1e-5, max_grad_norm=1.0,
                                 noise_multiplier_range=[0.9, 1.0])
    summary = run_outputs.summary(
        method, rank, centralised=centralised, privacy=private, seed=seed, num_clients=4, rounds=ROUNDS,
        rounds_completed=ROUNDS, initial_val_accuracy=0.25, final_val_accuracy=val_accuracy,
        final_val_loss=1.0, best_val_accuracy=val_accuracy, best_round=ROUNDS, test_accuracy=accuracy,
        test_loss=0.9, final_test_accuracy=accuracy - 0.05, final_test_loss=0.95, lr=lr,
        communication=communication, wall_s=9.0, oracle=oracle, init_source="pooled" if oracle else None)
    run_outputs.write_run(run_dir, summary, metrics)
    return run_dir


def _csv(value) -> str:
    return "" if value is None else ("true" if value is True else "false" if value is False else str(value))


def make_sweep(sweep_dir: Path, columns: list[str], cells: list[dict], tune: str | None = None) -> Path:
    """sweep.csv (as fedsb sweep writes it) over synthetic runs. A cell: grid values under their keys,
    plus method, rank, seed, accuracy (test), and optionally val_accuracy, lr, centralised, epsilon
    (None: no DP), status/error. `tune` goes into sweep.json as `fedsb sweep` records it."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if tune is not None:
        (sweep_dir / "sweep.json").write_text(json.dumps({"base": "base.yaml", "set": {}, "tune": tune}))
    with open(sweep_dir / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, csv_header(columns), restval="")
        writer.writeheader()
        for n, cell in enumerate(cells):
            grid = {k: cell[k] for k in columns if k in cell}
            row = {"cell": " ".join(f"{k}={format_value(v)}" for k, v in grid.items()),
                   **{k: format_value(v) for k, v in grid.items()},
                   "status": cell.get("status", COMPLETED), "error": cell.get("error", ""),
                   "method": cell["method"], "rank": cell["rank"], "seed": cell.get("seed", 0),
                   "lr": cell.get("lr", 0.005), "centralised": cell.get("centralised", False),
                   "privacy_requested": cell.get("epsilon") is not None,
                   "epsilon_target": cell.get("epsilon"), "elapsed_s": 60.0}
            if row["status"] == COMPLETED:
                run = make_run(sweep_dir / "runs" / f"run-{n}", cell["method"], cell["rank"],
                               cell.get("seed", 0), cell["accuracy"], cell.get("epsilon"),
                               cell.get("reports_privacy", True), cell.get("oracle", False),
                               cell.get("val_accuracy"), cell.get("lr", 0.005),
                               cell.get("centralised", False))
                row.update(result_fields(run), run_dir=f"runs/run-{n}")
            writer.writerow({k: _csv(v) for k, v in row.items()})
    return sweep_dir


def total_bytes(method: str, rank: int) -> int:
    return sum(size for *_, size in comm_rows(method, rank))


# --- the Pareto frontier ------------------------------------------------------------------------------

def test_pareto_frontier_on_a_hand_made_example():
    points = [
        (10, 0.70),   # 0: the cheapest: on the frontier
        (40, 0.80),   # 1: on
        (50, 0.60),   # 2: dominated by 0 and 1
        (200, 0.75),  # 3: dominated by 1
        (100, 0.85),  # 4: on
        (400, 0.84),  # 5: dominated by 4
        (1e4, 0.86),  # 6: on
        (2e4, 0.86),  # 7: as accurate as 6, dearer: dominated
        (40, 0.78),   # 8: same bytes as 1, less accurate: dominated
        (10, 0.70),   # 9: a duplicate of 0: the first one is kept
        (5, math.nan),  # 10: no accuracy: never on it
        (math.nan, 0.99),  # 11: no bytes: never on it
    ]
    assert pareto_frontier(points) == [0, 1, 4, 6]
    assert pareto_frontier([]) == []


# --- sweep figures ----------------------------------------------------------------------------------------

ACCURACY = {("fedsb", 4): 0.70, ("fedsb", 16): 0.80, ("ffa", 4): 0.60, ("ffa", 16): 0.75,
            ("fedit", 4): 0.85, ("fedit", 16): 0.84, ("fedex", 4): 0.86, ("fedex", 16): 0.86}


@pytest.fixture
def comm_sweep(tmp_path) -> Path:
    """4 methods x ranks 4, 16 x seeds 0, 1 (accuracy +- 0.01 around ACCURACY), and one failed cell."""
    cells = [{"method.name": m, "method.rank": r, "seed": s, "method": m, "rank": r,
              "accuracy": ACCURACY[m, r] + (0.01 if s else -0.01)}
             for m, r, s in itertools.product(METHODS, (4, 16), (0, 1))]
    cells.append({"method.name": "fedsb", "method.rank": 0, "seed": 0, "method": "fedsb", "rank": 0,
                  "status": "invalid config", "error": "method.rank: got 0; accepted: a positive integer"})
    return make_sweep(tmp_path / "comm", ["method.name", "method.rank", "seed"], cells)


def dominated(p, points) -> bool:
    """An independent check: another point at most as dear and at least as accurate, one strictly."""
    return any(q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in points)


def test_comm_vs_accuracy_has_a_marker_per_setting_and_the_right_frontier(comm_sweep):
    data = load_sweep_dir(comm_sweep)
    assert len(data.settings) == 8 and len(data.failed) == 1
    assert all(len(s.rows) == 2 for s in data.settings)
    fig = comm_vs_accuracy(data.settings)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert "bytes" in ax.get_xlabel() and "log scale" in ax.get_xlabel()
    assert ax.get_ylabel().startswith("test accuracy")
    containers = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in containers] == ["FedIT", "FFA-LoRA", "FedEx-LoRA", "Fed-SB"]
    assert all(len(c.lines[0].get_xdata()) == 2 for c in containers)  # one marker per rank
    # The markers are the means over seeds; the bars span min..max (+- 0.01).
    fedsb = containers[3]
    assert sorted(fedsb.lines[0].get_ydata()) == pytest.approx([0.70, 0.80])
    segments = [seg for col in fedsb.lines[2] for seg in col.get_segments()]
    spans = sorted(abs(seg[1][1] - seg[0][1]) for seg in segments if seg[1][1] != seg[0][1])
    assert spans == pytest.approx([0.02, 0.02])
    assert len(ax.texts) == 8  # each marker labelled with its rank

    points = {(m, r): (total_bytes(m, r), ACCURACY[m, r]) for m, r in ACCURACY}
    expected = sorted(p for p in points.values() if not dominated(p, list(points.values())))
    (frontier,) = [line for line in ax.lines if line.get_gid() == "frontier"]
    got = sorted(zip(frontier.get_xdata(), frontier.get_ydata(), strict=True))
    assert [x for x, _ in got] == [x for x, _ in expected]
    assert [y for _, y in got] == pytest.approx([y for _, y in expected])
    assert frontier.get_drawstyle() == "steps-post"


def test_round_figures_have_a_line_and_a_band_per_setting(comm_sweep):
    data = load_sweep_dir(comm_sweep)
    for fig in (accuracy_vs_round(data.settings), bytes_vs_round(data.settings)):
        (ax,) = fig.axes
        series = [line for line in ax.lines if line.get_gid() == "series"]
        assert len(series) == 8
        assert len({line.get_label() for line in series}) == 8
        assert len([c for c in ax.collections if c.get_gid() == "spread"]) == 8  # 2 seeds each
        assert ax.get_xlabel().startswith("round")
    accuracy = accuracy_vs_round(data.settings).axes[0]
    assert accuracy.get_ylabel() == "validation accuracy"
    line = next(line for line in accuracy.lines if line.get_label() == "fedsb r=16")
    assert list(line.get_xdata()) == [0, 1, 2]
    assert line.get_ydata()[-1] == pytest.approx(0.85)  # validation: the mean of 0.84 and 0.86
    cumulative = bytes_vs_round(data.settings).axes[0]
    assert cumulative.get_yscale() == "log"
    line = next(line for line in cumulative.lines if line.get_label() == "fedex r=4")
    assert line.get_ydata()[-1] == total_bytes("fedex", 4)
    assert math.isnan(line.get_ydata()[0])  # nothing sent before training: no point on a log axis


def test_bytes_by_component_stacks_each_component_per_direction(comm_sweep):
    data = load_sweep_dir(comm_sweep)
    panels = component_panels(data.settings)
    assert [title for title, _ in panels] == [f"{m} r={r}" for m in METHODS for r in (4, 16)]
    fig = bytes_by_component(panels)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert len(axes) == 8
    by_title = {ax.get_title(): ax for ax in axes}
    fedsb = by_title["fedsb r=4"]
    labels = [c.get_label() for c in fedsb.containers if isinstance(c, BarContainer)]
    assert labels == ["down lora_R", "down head", "down init", "up lora_R", "up head"]
    init = next(c for c in fedsb.containers if c.get_label() == "down init")
    assert [bar.get_height() for bar in init] == [40_000, 0]  # one-time: round 1 only
    head = next(c for c in fedsb.containers if c.get_label() == "down head")
    assert [bar.get_y() for bar in init] == [bar.get_y() + bar.get_height() for bar in head]  # stacked
    fedex = by_title["fedex r=16"]
    assert len(fedex.containers) == 7  # down: A, B, residual, head; up: A, B, head
    legend = fig.legends[0]
    assert {t.get_text() for t in legend.get_texts()} >= {"lora_A", "lora_B", "lora_R", "residual", "head",
                                                          "init"}


@pytest.fixture
def privacy_sweep(tmp_path) -> Path:
    """4 methods x {no DP, eps 1, eps 3} x seeds 0, 1."""
    budgets = [{"privacy.enabled": False}, {"privacy.enabled": True, "privacy.epsilon": 1},
               {"privacy.enabled": True, "privacy.epsilon": 3}]
    cells = []
    for m, budget, s in itertools.product(METHODS, budgets, (0, 1)):
        epsilon = budget.get("privacy.epsilon")
        accuracy = (0.8 if epsilon is None else 0.5 + 0.05 * epsilon) + 0.01 * s
        cells.append({"method.name": m, **budget, "seed": s, "method": m, "rank": 16, "accuracy": accuracy,
                      "epsilon": epsilon})
    return make_sweep(tmp_path / "privacy", ["method.name", "privacy.enabled", "privacy.epsilon", "seed"],
                      cells)


def test_privacy_vs_utility_has_a_line_per_method_and_a_non_private_reference(privacy_sweep):
    data = load_sweep_dir(privacy_sweep)
    assert sorted(s.label for s in data.settings if s.method == "fedsb") == [
        "fedsb r=16 no DP", "fedsb r=16 ε=1", "fedsb r=16 ε=3"]
    fig = privacy_vs_utility(data.settings)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and "ε" in ax.get_xlabel() and "δ ≤ 1e-05" in ax.get_xlabel()
    series = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(series) == 4
    for container in series:
        assert list(container.lines[0].get_xdata()) == [1, 3]
        assert list(container.lines[0].get_ydata()) == pytest.approx([0.555, 0.655])
    references = [line for line in ax.lines if line.get_gid() == "reference"]
    assert len(references) == 4
    assert all(line.get_ydata()[0] == pytest.approx(0.805) for line in references)
    assert {line.get_label() for line in references} == {f"{m} r=16, no DP" for m in METHODS}
    # The privacy sweep also draws the comm figure: one marker per setting, one series per method.
    comm = comm_vs_accuracy(data.settings).axes[0]
    markers = [len(c.lines[0].get_xdata()) for c in comm.containers if isinstance(c, ErrorbarContainer)]
    assert markers == [3] * 4


def test_no_privacy_figure_without_a_private_run(tmp_path, comm_sweep):
    assert privacy_vs_utility(load_sweep_dir(comm_sweep).settings) is None
    # Privacy asked for in the config but not reported by the run: not private, and labelled so.
    sweep_dir = make_sweep(tmp_path / "unreported", ["privacy.epsilon"], [
        {"privacy.epsilon": 3, "method": "fedsb", "rank": 4, "accuracy": 0.7, "epsilon": 3,
         "reports_privacy": False}])
    data = load_sweep_dir(sweep_dir)
    assert privacy_vs_utility(data.settings) is None
    assert data.settings[0].label == "fedsb r=4 ε=3 requested, not applied"


def test_the_pooled_init_oracle_is_labelled(tmp_path):
    sweep_dir = make_sweep(tmp_path / "oracle", ["method.init.source"], [
        {"method.init.source": source, "method": "fedsb", "rank": 4, "accuracy": 0.7,
         "oracle": source == "pooled"} for source in ("server", "pooled")])
    labels = [s.label for s in load_sweep_dir(sweep_dir).settings]
    assert labels == ["fedsb r=4 method.init.source=server",
                      "fedsb r=4 method.init.source=pooled (oracle init)"]


def test_plot_dir_on_a_sweep_writes_every_figure_and_the_report(comm_sweep, privacy_sweep):
    output = plot_dir(comm_sweep)
    assert set(output.figures) == {"comm_vs_accuracy", "accuracy_vs_round", "bytes_vs_round",
                                   "bytes_by_component"}
    assert sorted(p.name for p in output.files) == sorted(f"{n}.{ext}" for n in output.figures
                                                          for ext in ("png", "svg"))
    assert all(p.parent == comm_sweep / "report" and p.stat().st_size > 0 for p in output.files)
    report = output.report.read_text()
    assert report.startswith("# Sweep report: comm")
    assert "| fedsb r=4 | 2 | 0.700 [0.690, 0.710] |" in report
    frontier = report.split("## Pareto frontier")[1].split("##")[0]
    assert [line.split(":")[0] for line in frontier.splitlines() if line[:1].isdigit()] == [
        "1. ffa r=4", "2. fedit r=4", "3. fedex r=4"]  # the frontier of the figure test, from bytes
    assert "## Failed cells" in report and "method.rank: got 0" in report
    for name in output.figures:
        assert f"]({name}.png)" in report

    output = plot_dir(privacy_sweep, out=privacy_sweep / "elsewhere")
    assert "privacy_vs_utility" in output.figures
    assert (privacy_sweep / "elsewhere" / "privacy_vs_utility.svg").is_file()
    assert "| fedsb r=16 ε=3 | 2 | 0.655 [0.650, 0.660] |" in output.report.read_text()


# --- a tuned sweep (`tune: train.lr`) ------------------------------------------------------------------

# (setting, lr) -> (validation accuracy, test accuracy per seed 0, 1, 2). Validation and test disagree
# for fedsb (test prefers 0.03); the centralised fedit run (all data in one client) is the reference.
TUNED = {
    (("fedsb", False), 0.01): (0.80, [0.76, 0.78, 0.83]),
    (("fedsb", False), 0.03): (0.70, [0.90, 0.90, 0.90]),
    (("ffa", False), 0.001): (0.60, [0.80, 0.80, 0.80]),
    (("ffa", False), 0.01): (0.75, [0.70, 0.72, 0.71]),
    (("fedit", False), 0.01): (0.85, [0.85, 0.86, 0.87]),
    (("fedit", True), 0.01): (0.86, [0.99, 0.99, 0.99]),
    (("fedit", True), 0.03): (0.90, [0.90, 0.92, 0.94]),
}


@pytest.fixture
def tuned_sweep(tmp_path) -> Path:
    cells = [{"method.name": m, "federation.centralised": c, "train.lr": lr, "seed": seed, "method": m,
              "rank": 16, "lr": lr, "centralised": c, "val_accuracy": val, "accuracy": tests[seed]}
             for ((m, c), lr), (val, tests) in TUNED.items() for seed in range(3)]
    columns = ["method.name", "federation.centralised", "train.lr", "seed"]
    return make_sweep(tmp_path / "tuned", columns, cells, tune="train.lr")


def test_a_tuned_sweep_is_reported_per_group_at_the_value_chosen_on_validation(tuned_sweep):
    data = load_sweep_dir(tuned_sweep)
    assert data.tune == "train.lr"
    assert [(g.label, g.chosen.value) for g in data.tuned] == [
        ("fedsb r=16", "0.01"), ("ffa r=16", "0.01"), ("fedit r=16", "0.01"),
        ("LoRA r=16, centralised (not federated)", "0.03")]
    fedsb_tests, centralised_tests = [0.76, 0.78, 0.83], [0.90, 0.92, 0.94]

    output = plot_dir(tuned_sweep)
    (ax,) = output.figures["comm_vs_accuracy"].axes
    containers = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in containers] == ["Fed-SB", "FFA-LoRA", "FedIT"]  # no centralised marker
    assert [len(c.lines[0].get_xdata()) for c in containers] == [1, 1, 1]  # one marker per group
    assert all(c.lines[0].get_gid() == "series" for c in containers)
    fedsb = containers[0]
    mean, std = statistics.mean(fedsb_tests), statistics.stdev(fedsb_tests)
    assert list(fedsb.lines[0].get_xdata()) == [total_bytes("fedsb", 16)]
    assert list(fedsb.lines[0].get_ydata()) == pytest.approx([mean])  # at 0.01 (validation), not 0.03
    ((low, high),) = [(seg[0][1], seg[1][1]) for col in fedsb.lines[2] for seg in col.get_segments()]
    half = 4.303 * std / 3 ** 0.5  # error bars: the 95% CI over 3 seeds (t quantile from a printed table)
    assert (mean - low, high - mean) == pytest.approx((half, half), rel=1e-4)

    (reference,) = [line for line in ax.lines if line.get_gid() == "reference"]
    assert "centralised (not federated)" in reference.get_label()
    assert reference.get_ydata()[0] == pytest.approx(statistics.mean(centralised_tests))
    (band,) = [patch for patch in ax.patches if patch.get_gid() == "spread"]  # the 95% CI
    band_half = 4.303 * 0.02 / 3 ** 0.5
    assert (band.get_bbox().y0, band.get_bbox().y1) == pytest.approx((0.92 - band_half, 0.92 + band_half),
                                                                     rel=1e-4)
    # The frontier is over the federated groups only: ffa (cheapest), then fedit (more accurate).
    (frontier,) = [line for line in ax.lines if line.get_gid() == "frontier"]
    assert list(frontier.get_xdata()) == [total_bytes("ffa", 16), total_bytes("fedit", 16)]
    assert list(frontier.get_ydata()) == pytest.approx([0.71, 0.86])
    # The round figures show the chosen settings only: one line per group.
    rounds = output.figures["accuracy_vs_round"].axes[0]
    assert len([line for line in rounds.lines if line.get_gid() == "series"]) == 4

    report = output.report.read_text()
    assert report.startswith("# Sweep report: tuned\n\n## Tuned: `train.lr` chosen per setting on validation")
    assert report.index("## Tuned") < report.index("## Results")
    # mean [95% CI] over the 3 seeds: t = 4.303 (a printed table's 0.975 quantile at 2 degrees of freedom)
    row = (f"| fedsb r=16 | 0.01 | 3 | 0.800 | {mean:.3f} [{mean - half:.3f}, {mean + half:.3f}] | "
           f"{mean - 0.05:.3f} [{mean - 0.05 - half:.3f}, {mean - 0.05 + half:.3f}] | ")
    assert row in report
    assert "| LoRA r=16, centralised (not federated) | 0.03 | 3 | 0.900 | 0.920 [0.870, 0.970] |" in report
    assert "- fedsb r=16: **0.01 → 0.800 (3)**, 0.03 → 0.700 (3)" in report
    frontier_text = report.split("## Pareto frontier")[1].split("##")[0]
    assert [line.split(":")[0] for line in frontier_text.splitlines() if line[:1].isdigit()] == [
        "1. ffa r=16 lr=0.01", "2. fedit r=16 lr=0.01"]

    # --metric final_test_accuracy: the test split after the last round.
    final = tuned_comm_vs_accuracy(data.tuned, "final_test_accuracy").axes[0]
    marker = next(c for c in final.containers if c.get_label() == "Fed-SB")
    assert list(marker.lines[0].get_ydata()) == pytest.approx([mean - 0.05])


def test_without_tune_a_centralised_run_is_a_reference_line_too(tuned_sweep):
    (tuned_sweep / "sweep.json").unlink()
    data = load_sweep_dir(tuned_sweep)
    assert data.tune is None and data.tuned == []
    ax = comm_vs_accuracy(data.settings).axes[0]
    references = [line for line in ax.lines if line.get_gid() == "reference"]
    assert sorted(line.get_label() for line in references) == [
        f"LoRA r=16 train.lr={lr}, centralised (not federated)" for lr in ("0.01", "0.03")]
    markers = sum(len(c.lines[0].get_xdata()) for c in ax.containers if isinstance(c, ErrorbarContainer))
    assert markers == 5  # every federated setting, every lr


def test_plot_dir_on_a_run(tmp_path):
    run = make_run(tmp_path / "run", "fedex", 8, 0, 0.9)
    output = plot_dir(run)
    assert set(output.figures) == {"accuracy_vs_round", "bytes_vs_round", "bytes_by_component"}
    (ax,) = output.figures["accuracy_vs_round"].axes
    assert [line.get_label() for line in ax.lines if line.get_gid() == "series"] == ["fedex r=8"]
    report = output.report.read_text()
    assert report.startswith("# Run report: run") and "| 2 | 0.950 |" in report  # round 2's validation
    assert "| 0.900 | 0.950 (2) | 0.850 |" in report  # test at the best validation round, val, final test


def test_plot_dir_refuses_other_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a sweep directory"):
        plot_dir(tmp_path)


def test_palette_is_okabe_ito_and_every_method_has_its_own_marker():
    styles = [style.method_style(name) for name in method_names()]  # by registry index
    colours = {c for c, _ in styles}
    assert colours <= set(style.OKABE_ITO.values()) and len(colours) == len(method_names())
    assert len({m for _, m in styles}) == len(method_names())
    assert style.method_style("not-a-method") == style.UNKNOWN_METHOD_STYLE
    assert style.UNKNOWN_METHOD_STYLE[0] not in colours
    assert set(style.COMPONENT_COLORS.values()) <= set(style.OKABE_ITO.values())
