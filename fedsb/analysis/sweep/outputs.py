"""A cell's sweep.csv fields: from its config (what was asked) and its run's outputs (what happened).

The run's outputs are read through their schema, `fedsb.experiment.summary` (`RunSummary.read`,
`read_metrics`): a field the run recorder does not write is an error here at once, not a silent
empty column (this module used to read privacy keys no run ever wrote).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedsb.analysis.sweep.table import COMPONENTS, DIRECTIONS
from fedsb.experiment.config import ExperimentConfig
from fedsb.experiment.summary import (
    METRICS_FILE,
    SUMMARY_FILE,
    MetricsRow,
    PrivacySummary,
    RunSummary,
    read_metrics,
)


def result_fields(run_dir: Path) -> dict[str, Any]:
    """The sweep.csv fields read from a run directory (empty where the run left no summary.json)."""
    if not (run_dir / SUMMARY_FILE).is_file():
        return {}  # the run failed before it finished: its status and error say why
    summary = RunSummary.read(run_dir)
    out: dict[str, Any] = {
        "method_label": summary.method_label, "oracle": summary.oracle, "wall_s": summary.wall_s,
        "initial_val_accuracy": summary.initial_val_accuracy,
        "final_val_accuracy": summary.final_val_accuracy,
        "best_val_accuracy": summary.best_val_accuracy, "best_round": summary.best_round,
        "test_accuracy": summary.test_accuracy, "final_test_accuracy": summary.final_test_accuracy,
        "rounds": summary.rounds, "rounds_completed": summary.rounds_completed,
        "test_accuracy_at_rank": (json.dumps(summary.test_accuracy_at_rank, sort_keys=True)
                                  if summary.test_accuracy_at_rank else None),
    }
    for d in DIRECTIONS:  # communication: fedsb.experiment.meter.Meter.summary()
        part = summary.communication[d]
        out[f"bytes_{d}"] = part["bytes"]
        out[f"wire_bytes_{d}"] = part["wire_bytes"]
        for c in COMPONENTS:
            out[f"bytes_{d}_{c}"] = part["bytes_by_component"].get(c, 0)  # absent: the method never sends it
    out["bytes_total"] = out["bytes_up"] + out["bytes_down"]
    metrics = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
    out.update(privacy_fields(summary.privacy, metrics[-1] if metrics else None))
    return out


def privacy_fields(privacy: PrivacySummary | None, last_round: MetricsRow | None) -> dict[str, Any]:
    """`private`, `privacy_status` and what was spent (the largest over clients), from summary.json's
    `privacy` object (None: the run left no summary).

    A run whose privacy is not `enabled` was not private, whatever its config asked for; nor was one
    whose status says "not private" (DP-SGD ran, but e.g. the Fed-SB init pooled raw data).
    """
    if privacy is None:
        return {"private": False, "privacy_status": "not reported"}
    status = privacy.status or ("private" if privacy.enabled else "off")
    out: dict[str, Any] = {"private": privacy.enabled and status == "private", "privacy_status": status}
    if privacy.enabled:
        epsilon = privacy.epsilon_max
        if epsilon is None and last_round is not None:  # the last round's largest over every client
            epsilon = last_round.epsilon_max_all if last_round.epsilon_max_all is not None \
                else last_round.epsilon_max
        out["epsilon_max"] = epsilon
        out["delta"] = privacy.delta_max
        # [min, max] over clients (either may be None when no client trained): the largest is reported.
        noise = [v for v in privacy.noise_multiplier_range or [] if v is not None]
        out["noise_multiplier"] = max(noise) if noise else None
    return out


def config_fields(config: ExperimentConfig) -> dict[str, Any]:
    """The sweep.csv fields a cell's config decides (known even when its run fails)."""
    return {"method": config.method.name, "rank": config.method.rank, "lr": config.train.lr,
            "seed": config.seed, "centralised": config.federation.centralised,
            "privacy_requested": config.privacy.enabled,
            "epsilon_target": config.privacy.epsilon if config.privacy.enabled else None}
