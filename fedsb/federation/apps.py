"""Where the Flower app is, and how its ServerApp and ClientApp are loaded.

The apps live in the top-level `server/` and `clients/` folders of the app directory (the project
root), not in the installed `fedsb` package: they import `fedsb`, so `fedsb` cannot import them.
The in-process engine (`fedsb.federation.inprocess`) loads them with Flower's own functions, as a
SuperExec does: the components named in the app's pyproject.toml (`get_project_config`), imported
with the app directory first on `sys.path` (`load_app`), so both engines run the same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.common.config import get_project_config
from flwr.supercore.object_ref import load_app


def project_dir() -> Path:
    """The Flower app directory: the fedsb project root (where pyproject.toml has [tool.flwr.app])."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{root} has no pyproject.toml: install fedsb from a clone with "
                                "`pip install -e .`, or pass --app DIR")
    return root


def app_components(app_dir: str | Path) -> dict[str, str]:
    """`serverapp` and `clientapp` references ("module:attribute") of the app in app_dir."""
    return get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]


def load_client_app(app_dir: str | Path) -> Any:
    """The app's ClientApp."""
    return load_app(app_components(app_dir)["clientapp"], ImportError, app_dir)


def load_server_runner(app_dir: str | Path) -> Any:
    """`run_server(grid, run_config) -> ServerRun` from the ServerApp's module: the whole run the
    ServerApp's main runs, returning what it produced (the in-process engine's result)."""
    module = app_components(app_dir)["serverapp"].partition(":")[0]
    return load_app(f"{module}:run_server", ImportError, app_dir)
