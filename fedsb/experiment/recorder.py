"""The run recorder: writes a run's per-round outputs as they happen and its summary at the end."""

from __future__ import annotations

import csv
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsb.experiment.config import flatten
from fedsb.experiment.meter import CSV_FIELDS, Meter, read_comm_csv
from fedsb.experiment.summary import (
    METRICS_FILE,
    MetricsRow,
    PrivacySummary,
    RunSummary,
    append_metrics,
    read_metrics,
)
from fedsb.experiment.tracking import Tracking


class RunRecorder:
    """Writes a run's per-round outputs as they happen: metrics.jsonl, comm.csv and one log line.

    `end_round` is called once per round (round 0 = before training: the initial evaluation
    and any init traffic), after the round's messages have been metered, with the evaluation of
    the global state on the validation split. The config's trackers (`tracking`) get the same rows
    and, with the summary, the test numbers.
    """

    def __init__(self, run_dir: Path, meter: Meter, label: str, log: Callable[[str], None] = print,
                 accuracy_name: str = "accuracy", resume_after: int | None = None,
                 tracking: list[str] | None = None, config: dict[str, Any] | None = None):
        """`resume_after`: a resumed run's last checkpointed round, whose outputs are read back.
        `tracking`: tracker names (fedsb.experiment.tracking), started with the flattened `config`."""
        self.run_dir = Path(run_dir)
        self.tracking = Tracking(tracking or [])
        self.tracking.start(self.run_dir, self.run_dir.name, flatten(config or {}))
        self.meter = meter
        self.label = label  # e.g. "fedsb r=16": the prefix of every log line
        self.log = log
        self.accuracy_name = accuracy_name  # 'exact match' for a causal LM's generated answers
        self.start = time.monotonic()
        self.rows: list[MetricsRow] = []
        if resume_after is not None:
            self._restore(resume_after)
            return
        (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
        with open(self.run_dir / "comm.csv", "w", newline="") as f:
            csv.writer(f).writerow(CSV_FIELDS)

    def _restore(self, through_round: int) -> None:
        """Continue a resumed run from its own metrics.jsonl and comm.csv, read back through its last
        checkpointed round into the rows and the meter, and rewritten to them (whatever a stopped
        run wrote after that round is dropped)."""
        self.rows = [row for row in read_metrics(self.run_dir) if row.round <= through_round]
        self.meter.entries = [e for e in read_comm_csv(self.run_dir / "comm.csv") if e.round <= through_round]
        (self.run_dir / METRICS_FILE).write_text("")
        for row in self.rows:
            append_metrics(self.run_dir, row)
        with open(self.run_dir / "comm.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_FIELDS)
            writer.writerows(dataclasses.astuple(entry) for entry in self.meter.entries)
        if self.rows:  # wall time goes on from where the stopped run was
            self.start = time.monotonic() - self.rows[-1].wall_s

    def end_round(self, server_round: int, evaluation: dict[str, float], **extra: Any) -> MetricsRow:
        """`extra`: the MetricsRow fields of what the clients did (cohort, rejections, epsilon, ...)."""
        up = self.meter.total("bytes", round=server_round, direction="up")
        down = self.meter.total("bytes", round=server_round, direction="down")
        previous = self.rows[-1] if self.rows else None
        row = MetricsRow(
            round=server_round, val_accuracy=evaluation.get("accuracy"), val_loss=evaluation.get("loss"),
            val_perplexity=evaluation.get("perplexity"),
            bytes_up=up, bytes_down=down,
            cum_bytes_up=(previous.cum_bytes_up if previous else 0) + up,
            cum_bytes_down=(previous.cum_bytes_down if previous else 0) + down,
            wire_bytes_up=self.meter.total("wire_bytes", round=server_round, direction="up"),
            wire_bytes_down=self.meter.total("wire_bytes", round=server_round, direction="down"),
            wall_s=round(time.monotonic() - self.start, 2), **extra)
        self.rows.append(row)
        append_metrics(self.run_dir, row)
        self.tracking.log_round(dataclasses.asdict(row))
        with open(self.run_dir / "comm.csv", "a", newline="") as f:
            writer = csv.writer(f)
            for entry in self.meter.select(round=server_round):
                writer.writerow(dataclasses.astuple(entry))
        self.log(self._line(row))
        return row

    def _line(self, row: MetricsRow) -> str:
        line = (f"[{self.label}] round {row.round}: val {self.accuracy_name} {row.val_accuracy:.3f} "
                f"val loss {row.val_loss:.3f} "
                + (f"(perplexity {row.val_perplexity:.2f}) " if row.val_perplexity is not None else "")
                + "| "
                f"up {row.bytes_up:,} B, down {row.bytes_down:,} B (total up {row.cum_bytes_up:,} B, "
                f"down {row.cum_bytes_down:,} B) | {row.wall_s:.1f} s")
        if row.gpu_peak_bytes is not None:
            line += f" | GPU peak {row.gpu_peak_bytes / 2**30:.2f} GiB"
        if row.epsilon_max_all is not None:
            line += f" | epsilon max {row.epsilon_max_all:.2f}"
        if row.failed:
            reasons = "; ".join(f"client {c}: {r}" for c, r in row.failed.items())
            line += f" | failed {len(row.failed)}: {reasons}"
        if row.skipped:
            line += " | SKIPPED (too few valid updates: federation.min_clients)"
        if row.rejected:
            reasons = "; ".join(f"client {c}: {r}" for c, r in row.rejected.items())
            line += f" | rejected {len(row.rejected)}: {reasons}"
        return line

    def best_row(self) -> MetricsRow | None:
        """The trained round with the best validation accuracy (the first of equals): the chosen point."""
        trained = [r for r in self.rows if r.round > 0]
        return max(trained, key=lambda r: r.val_accuracy, default=None)

    def summary(self, setting: dict[str, Any], chosen_test: dict[str, float] | None = None,
                final_test: dict[str, float] | None = None,
                privacy: PrivacySummary | None = None) -> RunSummary:
        """summary.json: the test accuracy at the round chosen on validation (`test_accuracy`, the
        number to report) and at the last round, the validation accuracies, bytes, wall time, ...

        `setting`: the RunSummary fields that describe the run (method, rank, data, ...)."""
        trained = [r for r in self.rows if r.round > 0]
        best = self.best_row()
        chosen_test, final_test = chosen_test or {}, final_test or {}
        summary = RunSummary(
            **setting,
            rounds_completed=len(trained),
            selection="validation",
            initial_val_accuracy=self.rows[0].val_accuracy if self.rows else None,
            final_val_accuracy=trained[-1].val_accuracy if trained else None,
            final_val_loss=trained[-1].val_loss if trained else None,
            best_val_accuracy=best.val_accuracy if best else None,
            best_round=best.round if best else None,
            test_accuracy=chosen_test.get("accuracy"),
            test_loss=chosen_test.get("loss"),
            final_test_accuracy=final_test.get("accuracy"),
            final_test_loss=final_test.get("loss"),
            communication=self.meter.summary(),
            wall_s=round(time.monotonic() - self.start, 2),
            privacy=privacy or PrivacySummary(),
        )
        summary.write(self.run_dir)
        self.tracking.finish(dataclasses.asdict(summary))
        return summary
