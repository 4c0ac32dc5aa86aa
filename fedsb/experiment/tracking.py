"""Experiment tracking (`tracking:` in the config), as the Hugging Face Trainer's `report_to`.

Each tracker receives the run's config once, every round's metrics row (validation accuracy and
loss, bytes up and down, cumulative bytes, epsilon, ...) as the recorder writes it, and the
summary's test numbers at the end. They are small and registered by name, like Opacus's
accountants; the run directory's own files (metrics.jsonl, comm.csv, summary.json) stay the
record, and a tracker is a view of them in the user's tool:

- `tensorboard`: event files in `<run dir>/tensorboard` (`tensorboard --logdir runs`).
- `mlflow` (extra `fedsb[mlflow]`): a run in MLflow's store: `MLFLOW_TRACKING_URI` if set (a
  server, a database), else a file store in `<run dir>/mlruns`, which MLflow 3 keeps in maintenance
  mode and fedsb opts into (`MLFLOW_ALLOW_FILE_STORE`) because it needs nothing installed beyond
  `mlflow-skinny` (`mlflow ui --backend-store-uri <run dir>/mlruns` shows it).
- `wandb` (extra `fedsb[wandb]`): a Weights & Biases run, offline in `<run dir>/wandb` unless
  `WANDB_MODE` says otherwise (`wandb sync <run dir>/wandb/offline-run-*` uploads it later).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from fedsb.experiment.summary import MetricsRow

# A tracker plots, by round, every field of the metrics row that holds a number (`numbers` leaves out
# None, the cohort's lists and the reasons' dicts).
ROUND_METRICS = tuple(f.name for f in dataclasses.fields(MetricsRow) if f.name != "round")
SUMMARY_METRICS = ("test_accuracy", "test_loss", "final_test_accuracy", "final_test_loss",
                   "best_val_accuracy", "best_round", "rounds_completed", "wall_s")


class Tracker:
    """One tracking backend: `start` once, `log_round` per round, `finish` once."""

    name: ClassVar[str]
    package: ClassVar[str]  # the module it needs
    extra: ClassVar[str | None] = None  # the pip extra that installs it

    def start(self, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def finish(self, summary: Mapping[str, float]) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    name, package = "tensorboard", "tensorboard"

    def start(self, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        lines = [f"| {k} | {v} |" for k, v in sorted(config.items())]
        self.writer.add_text("config", "\n".join(["| key | value |", "|---|---|", *lines]), 0)

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a round is minutes apart: make it visible now

    def finish(self, summary: Mapping[str, float]) -> None:
        for name, value in summary.items():
            self.writer.add_scalar(f"summary/{name}", value, 0)
        self.writer.close()


class MLflowTracker(Tracker):
    name, package, extra = "mlflow", "mlflow", "mlflow"

    def start(self, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a file store beside the run's own files; MLflow 3 asks for this opt-in to it
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fedsb")
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for k, v in config.items():  # MLflow caps a parameter's value at 6,000 characters
            self.client.log_param(self.run_id, k, str(v)[:6000])

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.client.log_metric(self.run_id, name, value, step=step)

    def finish(self, summary: Mapping[str, float]) -> None:
        for name, value in summary.items():
            self.client.log_metric(self.run_id, f"summary/{name}", value)
        self.client.set_terminated(self.run_id)


class WandbTracker(Tracker):
    name, package, extra = "wandb", "wandb", "wandb"

    def start(self, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fedsb"), name=run_name,
                              dir=str(run_dir), config=dict(config),
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, summary: Mapping[str, float]) -> None:
        self.run.summary.update(dict(summary))
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoardTracker, MLflowTracker, WandbTracker)}


def tracking_problem(names: list[str]) -> str | None:
    """Why `tracking:` cannot be used as given (an unknown name, a missing package), or None."""
    for name in names:
        if name not in TRACKERS:
            return f"got {name!r}; accepted: a list of " + ", ".join(repr(n) for n in TRACKERS)
        tracker = TRACKERS[name]
        if importlib.util.find_spec(tracker.package) is None:
            install = f"'fedsb[{tracker.extra}]'" if tracker.extra else tracker.package
            return f"{name!r} needs the {tracker.package} package (pip install {install})"
    if len(set(names)) != len(names):
        return f"got {names}; each tracker once"
    return None


def numbers(values: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    """The finite numbers among values[keys] (None and lists left out)."""
    out = {}
    for k in keys:
        v = values.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


class Tracking:
    """The run's trackers, started together; what one cannot do stops the run as any error would."""

    def __init__(self, names: list[str]):
        self.trackers = [TRACKERS[name]() for name in names]

    def start(self, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.start(run_dir, run_name, config)

    def log_round(self, row: Mapping[str, Any]) -> None:
        metrics = numbers(row, ROUND_METRICS)
        for tracker in self.trackers:
            tracker.log_round(int(row["round"]), metrics)

    def finish(self, summary: Mapping[str, Any]) -> None:
        values = numbers(summary, SUMMARY_METRICS)
        for tracker in self.trackers:
            tracker.finish(values)
