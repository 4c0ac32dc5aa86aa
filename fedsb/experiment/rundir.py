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
