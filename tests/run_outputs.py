"""Schema-valid run outputs for the tests that fabricate run directories (a fake runner, synthetic
sweeps): summary.json and metrics.jsonl built from fedsb.experiment.summary, as the run recorder
writes them, so a fake cannot write a key the real runs never write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsb.experiment.summary import MetricsRow, PrivacySummary, RunSummary, append_metrics
from fedsb.methods import get_method


def summary(method: str, rank: int, *, centralised: bool = False, privacy: PrivacySummary | None = None,
            **fields: Any) -> RunSummary:
    """A finished run's summary: a small setting, overridden by `fields` (RunSummary's fields only).
    method_label is the method's, as the server sets it (a centralised run: its centralised adapter)."""
    cls = get_method(method)
    values: dict[str, Any] = dict(
        method=method, method_label=cls.centralised_label if centralised else cls.label, rank=rank,
        alpha=float(rank), seed=0, model="tiny-bert", data="synthetic", num_clients=4, connected_clients=4,
        clients_per_round=4, rounds=1, local_steps=1, lr=0.01, init_lr=0.01, weighting="examples",
        centralised=centralised, init_source=None, oracle=False,
        partition={"scheme": "dirichlet", "alpha": 0.5}, run_dir="", rounds_completed=1,
        selection="validation", initial_val_accuracy=0.25, final_val_accuracy=None, final_val_loss=None,
        best_val_accuracy=None, best_round=None, test_accuracy=None, test_loss=None,
        final_test_accuracy=None, final_test_loss=None, communication={}, wall_s=0.0)
    values.update(fields)
    return RunSummary(**values, privacy=privacy or PrivacySummary())


def metrics_row(round: int, val_accuracy: float, val_loss: float, *, bytes_up: int = 0, bytes_down: int = 0,
                cum_bytes_up: int = 0, cum_bytes_down: int = 0, **fields: Any) -> MetricsRow:
    """One metrics.jsonl line (wire bytes: the payload's, wall time 0 unless given)."""
    return MetricsRow(round=round, val_accuracy=val_accuracy, val_loss=val_loss, bytes_up=bytes_up,
                      bytes_down=bytes_down, cum_bytes_up=cum_bytes_up, cum_bytes_down=cum_bytes_down,
                      wire_bytes_up=fields.pop("wire_bytes_up", bytes_up),
                      wire_bytes_down=fields.pop("wire_bytes_down", bytes_down),
                      wall_s=fields.pop("wall_s", 0.0), **fields)


def write_run(run_dir: Path, run_summary: RunSummary, rows: list[MetricsRow]) -> Path:
    """summary.json and metrics.jsonl in `run_dir` (created), as the run recorder writes them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_summary.run_dir = str(run_dir)
    for row in rows:
        append_metrics(run_dir, row)
    run_summary.write(run_dir)
    return run_dir
