"""sweep.csv: its columns, reading it, and appending a cell's row (widening the header as the grid grows).

One row per finished cell, appended as soon as the cell ends, so an interrupted sweep loses nothing;
a retried cell gets another row and its latest row counts (`latest_rows`). The columns are "cell",
the grid's config keys, then RESULT_FIELDS. Values are text as `csv_value` writes them.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsb.analysis.sweep.spec import unique

SWEEP_CSV = "sweep.csv"  # in the sweep directory
TUNED_CSV = "tuned.csv"  # with `tune`: fedsb.analysis.sweep.tuning
COMPLETED = "finished:completed"  # fedsb.ops.launch.COMPLETED (not imported here: launch loads torch)
INVALID_CONFIG = "invalid config"  # the cell's config did not validate: nothing was started
ERROR = "error"  # run_simulation raised (e.g. the SuperLink did not start)
INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM stopped the cell's run (and the sweep); rerun next time
# Same order as fedsb.experiment.comm.METER_COMPONENTS (importing fedsb.experiment.comm would load torch).
COMPONENTS = ("lora_A", "lora_B", "lora_R", "residual", "bone_block", "mora_M", "head", "init")
DIRECTIONS = ("up", "down")
RESULT_FIELDS = (
    "status", "error", "method",
    "method_label",  # the run's summary.json method_label: how figures and tables name its method
    "rank", "lr", "seed",
    "centralised",  # all clients' data pooled in one client: a reference, not a federated result
    # Privacy: `delta` is summary.json's privacy.delta_max, `noise_multiplier` the top of its
    # noise_multiplier_range (the largest over clients, as epsilon_max).
    "privacy_requested", "private", "privacy_status", "epsilon_target", "epsilon_max", "delta",
    "noise_multiplier", "oracle",  # oracle: a pooled-data init (the Fed-SB paper's setting), not federated
    # Validation selects the round (best_round); test_accuracy is the test split at that round, the
    # number to report; final_test_accuracy the test split after the last round.
    "initial_val_accuracy", "final_val_accuracy", "best_val_accuracy", "best_round",
    "test_accuracy", "final_test_accuracy",
    # Clients of different ranks: the chosen round's adapter truncated to each rank, JSON {"4": 0.71}
    "test_accuracy_at_rank",
    "rounds", "rounds_completed",
    "bytes_up", "bytes_down", "bytes_total", "wire_bytes_up", "wire_bytes_down",
    *(f"bytes_{d}_{c}" for d in DIRECTIONS for c in COMPONENTS),
    "wall_s", "elapsed_s", "run_dir", "finished_at",
)


def csv_header(columns: Sequence[str]) -> list[str]:
    """sweep.csv's header for a grid over `columns`."""
    # A grid over `seed` shares its column with the result field `seed` (the same value).
    return unique(["cell", *columns, *RESULT_FIELDS])


def read_rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """sweep.csv as (header, rows of strings); ([], []) if there is none."""
    if not csv_path.is_file():
        return [], []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def grid_columns(header: Sequence[str]) -> list[str]:
    """The grid columns of a sweep.csv header: those between 'cell' and 'status'."""
    return list(header[1:header.index("status")]) if "status" in header else []


def latest_rows(rows: Iterable[dict[str, str]]) -> dict[str, dict[str, str]]:
    """cell label -> its latest row (a retried cell has several)."""
    latest: dict[str, dict[str, str]] = {}
    for row in rows:
        latest[row["cell"]] = row
    return latest


def append_row(csv_path: Path, columns: Sequence[str], row: Mapping[str, Any]) -> None:
    """Append one cell's row to sweep.csv, rewriting the file first if its header must widen."""
    old_header, old_rows = read_rows(csv_path)
    header = csv_header(unique([*grid_columns(old_header), *columns]))
    header += [k for k in old_header if k not in header]  # a field of an older schema keeps its values
    if old_header != header:
        # A new file, or the grid grew a key: (re)write it with the wider header (old rows blank there).
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, header, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(old_rows)
    with open(csv_path, "a", newline="") as f:
        csv.DictWriter(f, header, restval="", extrasaction="ignore").writerow(row)


def csv_value(value: Any) -> Any:
    """A value as sweep.csv and tuned.csv write it: '' for None, true/false, 6 significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e15 else repr(value)
    return value
