"""The run directory: config snapshot, per-round metrics, comm log, summary, exported adapter.

    <output_dir>/<run name>/
        config.yaml     the resolved config
        metrics.jsonl   one row per round (the global state on the validation split)
        comm.csv        one row per (round, client, direction, component) from the meter
        summary.json    test accuracy at the round chosen on validation and at the last round,
                        validation accuracy per choice, bytes by direction and component, ...
        partition.png   label distribution per client
        adapter/        the final global adapter in PEFT LoRA format (merged/ too for FedEx-LoRA)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from fedsb.experiment.config import ExperimentConfig


def run_name(config: ExperimentConfig) -> str:
    """A run directory's name after its timestamp: method, rank and seed (the one naming rule)."""
    return f"{config.method.name}-r{config.method.rank}-s{config.seed}"


def run_dir_for(config: ExperimentConfig, given: str | Path | None = None) -> Path:
    """`given` (created if needed), else a fresh directory under the config's output_dir."""
    if given:
        path = Path(given).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return new_run_dir(config.output_dir, run_name(config))


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """A fresh, absolute run directory under output_dir (suffixed if the name is taken)."""
    root = Path(output_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{stamp}-{name}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / f"{stamp}-{name}-{suffix}"
    path.mkdir()
    return path


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: the files stay strict JSON (e.g. DP runs release no loss)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(json_safe(row)) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
