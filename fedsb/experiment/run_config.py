"""The Flower run config (`flwr run . --run-config "..."`, `[tool.flwr.app.config]`) -> an experiment
config, and back (the `overrides` string)."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

from fedsb.experiment.config import ExperimentConfig, load_config, load_yaml, parse_override

# The few settings `flwr run . --run-config "..."` can override directly, and the config key each
# one sets. An empty string / 0 / -1 (the pyproject defaults) means "keep the YAML file's value".
RUN_CONFIG_KEYS = {
    "method": "method.name",
    "num-rounds": "federation.rounds",
    "rank": "method.rank",
    "seed": "seed",
    "output-dir": "output_dir",
}
_UNSET = ("", 0, -1, None)


def parse_override_list(text: str) -> dict[str, Any]:
    """'a.b=1; c=x' (the run config's `overrides` string) -> {'a.b': 1, 'c': 'x'}."""
    return dict(parse_override(item) for item in text.split(";") if item.strip())


def format_override_list(overrides: typing.Mapping[str, Any]) -> str:
    """{'a.b': 1, 'c': 'x'} -> 'a.b=1; c="x"': a run config's `overrides` (parse_override_list's inverse)."""
    return "; ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())


def from_run_config(run_config: typing.Mapping[str, Any], app_dir: str | Path) -> ExperimentConfig:
    """The experiment config of a Flower run: the YAML file named by `config` (relative to the
    app directory, or absolute), then the run config's `overrides` string, then its direct keys
    (`privacy-epsilon` > 0 turns DP on with that target)."""
    path = Path(app_dir) / str(run_config.get("config") or "configs/default.yaml")
    overrides = parse_override_list(str(run_config.get("overrides", "")))
    for run_key, config_key in RUN_CONFIG_KEYS.items():
        value = run_config.get(run_key)
        if value not in _UNSET:
            # Flower does not type-check overrides (seed='7' arrives as a string): parse as YAML.
            parse = isinstance(value, str) and run_key != "output-dir"
            overrides[config_key] = load_yaml(value) if parse else value
    epsilon = run_config.get("privacy-epsilon")
    if epsilon not in _UNSET:  # a target epsilon turns DP-SGD on
        overrides.update({"privacy.enabled": True, "privacy.epsilon": load_yaml(str(epsilon))})
    return load_config(path, overrides)
