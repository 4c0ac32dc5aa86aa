"""Running a sweep: every cell not yet completed, one real run each, one sweep.csv row as each ends.

Every cell is one real run through `fedsb.ops.launch.run_simulation` (the path of `fedsb run`), with its
runs under <sweep dir>/runs; the cells share one SuperLink (`LocalSimulation`), started by the first
cell that runs and stopped when the sweep ends (each cell is its own Flower run, with its own simulation
process and Ray session, as Flower starts one per run). As soon as a cell ends, one row is appended to
<sweep dir>/sweep.csv (fedsb.analysis.sweep.table). Running the sweep again skips the cells whose latest
row is completed and retries the others; a failed cell (a bad value stops at config validation; a Flower
run can fail) is recorded and the sweep goes on. A cell whose run is interrupted (Ctrl-C, SIGTERM: the
run and its processes are stopped first, fedsb.ops.launch) is recorded as `interrupted` and the sweep
stops there, re-raising the interrupt (`fedsb sweep` exits with 128 + the signal number); the next
`fedsb sweep` reruns it, as any cell not completed. With `tune`, tuned.csv is written at the end
(fedsb.analysis.sweep.tuning).

Progress over the whole sweep is a tqdm bar (cells done, elapsed, time left) on `progress`; each cell
also gets its own lines through `echo` (what runs, and how it ended: status, accuracy, run dir)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import yaml
from tqdm import tqdm

from fedsb.analysis.sweep.compare import PAIRED_CSV, paired_differences, write_paired
from fedsb.analysis.sweep.outputs import config_fields, result_fields
from fedsb.analysis.sweep.report import cell_outcome, paired_table, tuned_table
from fedsb.analysis.sweep.spec import RESULT_FILES, Cell, SweepSpec, format_value, load_sweep, record_pin
from fedsb.analysis.sweep.table import (
    COMPLETED,
    ERROR,
    INTERRUPTED,
    INVALID_CONFIG,
    SWEEP_CSV,
    TUNED_CSV,
    append_row,
    csv_value,
    latest_rows,
    read_rows,
)
from fedsb.analysis.sweep.tuning import TunedGroup, in_grid_order, tune_results, write_tuned
from fedsb.experiment.config import ConfigError, load_config


class Outcome(Protocol):
    """What a runner returns (fedsb.ops.launch.RunOutcome)."""

    status: str
    details: str
    run_dir: Path
    elapsed_s: float


Runner = Callable[..., Outcome]  # run_simulation's signature


class CellInterrupted(KeyboardInterrupt):
    """A cell's run was interrupted: `row` is its sweep.csv row (status `interrupted`), `signum` the
    signal (SIGINT for a plain KeyboardInterrupt)."""

    def __init__(self, row: dict[str, Any], signum: int) -> None:
        super().__init__(row.get("error", "interrupted"))
        self.row = row
        self.signum = signum


@dataclass
class SweepResult:
    spec: SweepSpec
    csv_path: Path
    ran: list[dict[str, Any]]  # the rows written by this invocation
    skipped: list[Cell]  # completed earlier
    tuned: list[TunedGroup] = dataclasses.field(default_factory=list)  # with `tune`: tuned.csv's groups

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.ran if row["status"] != COMPLETED]


def run_sweep(path: str | Path, *, runner: Runner | None = None, stream: bool = False,
              cpus_per_client: int = 1, gpus_per_client: float = 0.0, app_dir: Path | None = None,
              engine: str | None = None, echo: Callable[[str], None] = print,
              progress: TextIO | None = None) -> SweepResult:
    """Run every cell not yet completed, appending one sweep.csv row per cell as it ends.

    `engine` (flower | inprocess; default: the sweep file's `engine`, else flower) runs the cells;
    `echo` gets the per-cell lines; `progress` (e.g. sys.stderr), if given, shows a tqdm bar over
    the sweep's cells (the cells completed earlier count as done from the start).
    """
    spec = load_sweep(path)
    record_pin(spec)
    with contextlib.ExitStack() as stack:
        if runner is None:
            from fedsb.ops.launch import DEFAULT_ENGINE, ENGINES, LocalSimulation, run_simulation

            name = engine or spec.engine or DEFAULT_ENGINE
            echo(f"fedsb sweep: engine {name}")
            if ENGINES[name] is run_simulation:  # every cell through one SuperLink, started by the first
                simulation = stack.enter_context(LocalSimulation(echo))
                runner = functools.partial(run_simulation, simulation=simulation)
            else:
                runner = ENGINES[name]
        return _run_cells(spec, path, runner, stream=stream, cpus_per_client=cpus_per_client,
                          gpus_per_client=gpus_per_client, app_dir=app_dir, echo=echo, progress=progress)


def _run_cells(spec: SweepSpec, path: str | Path, runner: Runner, *, stream: bool, cpus_per_client: int,
               gpus_per_client: float, app_dir: Path | None, echo: Callable[[str], None],
               progress: TextIO | None) -> SweepResult:
    csv_path = spec.output_dir / SWEEP_CSV
    latest = latest_rows(read_rows(csv_path)[1])
    cells = spec.cells()
    skipped = [c for c in cells if latest.get(c.label, {}).get("status") == COMPLETED]
    todo = [c for c in cells if c not in skipped]
    echo(f"fedsb sweep: {len(cells)} cells ({spec.shape}) on {spec.base} -> {spec.output_dir}; "
         f"{len(skipped)} completed earlier, {len(todo)} to run")
    for cell in skipped:
        accuracy = latest[cell.label].get("test_accuracy") or "?"
        echo(f"[{cell.index}/{len(cells)}] skip {cell.label}: completed earlier (test accuracy {accuracy})")

    ran: list[dict[str, Any]] = []
    started = time.monotonic()
    with tqdm(total=len(cells), initial=len(skipped), unit="cell", desc="fedsb sweep", file=progress,
              disable=progress is None, dynamic_ncols=True) as bar:
        for cell in todo:
            echo(f"[{cell.index}/{len(cells)}] run  {cell.label}")
            try:
                row = run_cell(spec, cell, runner, stream=stream, cpus_per_client=cpus_per_client,
                               gpus_per_client=gpus_per_client, app_dir=app_dir,
                               echo=lambda line: echo(f"    {line}"))
            except CellInterrupted as stop:
                append_row(csv_path, spec.columns, stop.row)
                echo(f"[{cell.index}/{len(cells)}] {INTERRUPTED}: {cell.label}; the sweep stops here "
                     f"(`fedsb sweep {path}` again reruns it and every cell not yet completed)")
                raise
            append_row(csv_path, spec.columns, row)
            ran.append(row)
            if spec.keep == "results" and row["status"] == COMPLETED:
                keep_results_only(spec.output_dir / row["run_dir"])
            write_tuning(spec, cells)  # kept current: a study stopped at any cell has its tables
            echo(f"[{cell.index}/{len(cells)}] {cell_outcome(row)}")
            echo(pace(len(ran), len(todo), time.monotonic() - started))
            if row.get("privacy_requested") == "true" and row.get("private") == "false":
                echo(f"    warning: privacy.enabled was set but the run's privacy status is "
                     f"'{row['privacy_status']}': it is recorded and plotted as not private")
            bar.update(1)

    result = SweepResult(spec, csv_path, ran, skipped)
    done = len(skipped) + len(ran) - len(result.failed)
    echo(f"fedsb sweep: {done}/{len(cells)} cells completed, {len(result.failed)} failed; "
         f"results in {csv_path}; figures: fedsb plot {spec.output_dir}")
    result.tuned = write_tuning(spec, cells)
    if spec.tune is None:
        return result
    over = f"seeds {', '.join(map(str, spec.tune_seeds))}" if spec.tune_seeds else "the completed seeds"
    echo(f"fedsb sweep: {spec.tune} chosen per group on validation accuracy (mean over {over}); "
         f"test accuracies are means [95% CI] over seeds; written to {spec.output_dir / TUNED_CSV}")
    for line in tuned_table(result.tuned):
        echo(f"    {line}")
    pairs = paired_differences(result.tuned, spec.compare)
    if pairs:
        echo(f"fedsb sweep: paired differences over seeds (a - b, mean [95% CI]); written to "
             f"{spec.output_dir / PAIRED_CSV}")
        for line in paired_table(pairs):
            echo(f"    {line}")
    return result


def write_tuning(spec: SweepSpec, cells: list[Cell]) -> list[TunedGroup]:
    """With `tune`: tuned.csv and paired.csv from sweep.csv as it stands (and the groups); without,
    remove any left by an earlier `tune` (they would no longer match the sweep)."""
    tuned_path, paired_path = spec.output_dir / TUNED_CSV, spec.output_dir / PAIRED_CSV
    if spec.tune is None:
        tuned_path.unlink(missing_ok=True)
        paired_path.unlink(missing_ok=True)
        return []
    rows = in_grid_order(read_rows(spec.output_dir / SWEEP_CSV)[1], [c.label for c in cells])
    groups = tune_results(rows, spec.columns, spec.tune, spec.tune_seeds)
    write_tuned(tuned_path, groups)
    write_paired(paired_path, paired_differences(groups, spec.compare))
    return groups


def run_cell(spec: SweepSpec, cell: Cell, runner: Runner, *, stream: bool = False, cpus_per_client: int = 1,
             gpus_per_client: float = 0.0, app_dir: Path | None = None,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one cell and return its sweep.csv row; a failed run is a row, never an exception.

    An interrupted run (KeyboardInterrupt: Ctrl-C, or SIGTERM through fedsb.ops.interrupts) raises
    CellInterrupted with the cell's row, status `interrupted`. (A finished run whose summary.json
    does not match the schema does raise: that is a bug of the writer or this reader, not a result.)
    """
    overrides = {**spec.fixed, **cell.overrides, "output_dir": str(spec.output_dir / "runs")}
    row: dict[str, Any] = {"cell": cell.label, **{k: format_value(v) for k, v in cell.overrides.items()},
                           "run_dir": "", "elapsed_s": 0.0, "error": ""}
    try:
        config = load_config(spec.base, overrides)  # a bad value stops here, before anything starts
    except ConfigError as err:
        row.update(status=INVALID_CONFIG, error=str(err))
        return _finish(row)
    row.update(config_fields(config))
    try:
        gpus = {"gpus_per_client": gpus_per_client} if gpus_per_client else {}  # CPU: runner default
        outcome = runner(spec.base, overrides, app_dir=app_dir, cpus_per_client=cpus_per_client,
                         stream=stream, echo=echo, **gpus)
    except Exception as err:  # any failure of one cell is that cell's result: the sweep goes on
        row.update(status=ERROR, error=f"{type(err).__name__}: {err}")
        return _finish(row)
    except KeyboardInterrupt as err:  # the run and its processes are stopped by now
        signum = int(getattr(err, "signum", signal.SIGINT))
        row.update(status=INTERRUPTED, error=f"interrupted by {signal.Signals(signum).name}")
        raise CellInterrupted(_finish(row), signum) from err
    row.update(status=outcome.status, elapsed_s=round(outcome.elapsed_s, 1),
               error="" if outcome.status == COMPLETED else (outcome.details or outcome.status))
    run_dir = Path(outcome.run_dir)
    # Relative to the sweep directory, so that a moved or copied sweep directory still plots.
    row["run_dir"] = str(run_dir.relative_to(spec.output_dir)) if run_dir.is_relative_to(spec.output_dir) \
        else str(run_dir)
    row.update(result_fields(run_dir))
    return _finish(row)


def pace(done: int, todo: int, elapsed_s: float) -> str:
    """'3/40 cells of this invocation in 12 min: 15.0 cells/h, about 2 h 28 min left'."""
    per_hour = done / elapsed_s * 3600 if elapsed_s > 0 else 0.0
    left_s = (todo - done) * elapsed_s / done if done else 0.0
    hours, minutes = divmod(round(left_s / 60), 60)
    left = f"{hours} h {minutes} min" if hours else f"{minutes} min"
    return (f"fedsb sweep: {done}/{todo} cells of this invocation in {elapsed_s / 60:.0f} min: "
            f"{per_hour:.1f} cells/h, about {left} left")


def keep_results_only(run_dir: Path) -> None:
    """A study's cell keeps its small outputs (RESULT_FILES) and nothing else: no weights, no
    prepared tokens, no checkpoints (`keep: results` in the sweep file). The paths they name are
    made relative to the run directory, so that the files hold no path of one machine."""
    if not run_dir.is_dir():
        return
    for path in sorted(run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        elif path.relative_to(run_dir).as_posix() not in RESULT_FILES:
            path.unlink()
    _relative_paths(run_dir)


# The config keys and summary fields that hold a local path (a file source, the output directory).
CONFIG_PATHS = (("data", "source"), ("data", "test_file"), ("data", "val_file"), ("output_dir",))
SUMMARY_PATHS = ("data", "run_dir")


def _relative_paths(run_dir: Path) -> None:
    def relative(value: Any) -> Any:
        if isinstance(value, str) and os.path.isabs(value):
            return os.path.relpath(value, run_dir)
        return value

    config_path, summary_path = run_dir / "config.yaml", run_dir / "summary.json"
    if config_path.is_file():
        config = yaml.safe_load(config_path.read_text())
        for *section, name in CONFIG_PATHS:
            node = config
            for part in section:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and name in node:
                node[name] = relative(node[name])
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        for name in SUMMARY_PATHS:
            if name in summary:
                summary[name] = relative(summary[name])
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")


def kept_paths(run_dir: Path) -> dict[str, str]:
    """The path keys of a kept cell's config.yaml (relative to the run directory, as
    `_relative_paths` wrote them) as dotted overrides with absolute paths again: what rerunning the
    cell from another directory needs. Values that do not name an existing path are left out."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    paths = {}
    for keys in CONFIG_PATHS:
        node = config
        for part in keys:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, str) and not os.path.isabs(node) and (run_dir / node).exists():
            paths[".".join(keys)] = str((run_dir / node).resolve())
    return paths


def _finish(row: dict[str, Any]) -> dict[str, Any]:
    row["error"] = " ".join(str(row.get("error", "")).split())  # one line in the CSV
    row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return {k: csv_value(v) for k, v in row.items()}
