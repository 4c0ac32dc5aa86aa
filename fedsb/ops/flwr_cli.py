"""Driving the installed `flwr` command line: its environment, its connection config, its JSON replies.

Shared by `fedsb run` (fedsb.ops.launch) and the local deployment (fedsb.ops.deploy.local). fedsb
never imports flwr to talk to a SuperLink; it runs `flwr ... --format json` in a subprocess.
flwr 1.41 facts this relies on:
- `flwr ... --format json` exits 0 even when it failed: the reply's `"success"` is what counts,
  and the reply may come after other output (warnings);
- the CLI finds a SuperLink by a named connection in `$FLWR_HOME/config.toml`;
- a run's final status (`flwr ls --run-id`) starts with `finished:`; `finished:completed` is success.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsb.ops.processes import ProcessError

FINISHED = "finished:"
COMPLETED = "finished:completed"
# Environment for every Flower process and `flwr` call: no per-run `uv sync` of the app's
# dependencies, no telemetry, no update check (offline machines).
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
}


class FlwrError(ProcessError):
    """A `flwr` command failed, did not answer in time, or printed no JSON reply."""


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus FLOWER_ENV, `extra` and FLWR_HOME (a SuperLink keeps the
    environment it was started with for the apps it runs)."""
    return {**os.environ, **FLOWER_ENV, **(extra or {}), "FLWR_HOME": str(flwr_home)}


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> Path:
    """Write `$FLWR_HOME/config.toml` with one SuperLink connection `name`, the default; TLS with
    `root_certificates`, else insecure."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates is not None:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates))}")
    else:
        lines.append("insecure = true")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def json_from(text: str) -> dict:
    """The JSON object in a `flwr ... --format json` output (it may be preceded by other text)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in output")
    return json.JSONDecoder().raw_decode(text[start:])[0]


def run_flwr(args: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout: float = 120,
             check: bool = False) -> dict[str, Any]:
    """Run `flwr ARGS --format json` and return its JSON reply.

    FlwrError if it does not answer within `timeout` seconds or prints no JSON, and, with `check`,
    if the reply says `"success": false`; without `check` the caller reads `"success"` itself.
    """
    argv = ["flwr", *args, "--format", "json"]
    command = " ".join(argv)
    try:
        cp = subprocess.run(argv, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise FlwrError(f"`{command}` did not answer within {timeout:.0f} s") from err
    try:
        data = json_from(cp.stdout)
    except ValueError:
        output = (cp.stdout + cp.stderr).strip()[-2000:]
        raise FlwrError(f"`{command}` failed (exit {cp.returncode}) without a JSON reply: {output}") from None
    if check and not data.get("success", False):
        raise FlwrError(f"`{command}` failed (exit {cp.returncode}): "
                        f"{data.get('error-message') or cp.stderr.strip()}")
    return data


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"run-config values must be bool, int, float or str, got {type(value).__name__}")


def write_run_config(path: Path, run_config: Mapping[str, object]) -> Path:
    """Write run-config overrides as a TOML file (what `flwr run --run-config FILE.toml` reads;
    safe for paths with spaces and quotes, unlike the inline `k=v` form)."""
    lines = [f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in run_config.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
