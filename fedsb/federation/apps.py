"""Where the Flower app is, and how its ServerApp and ClientApp are loaded.

The apps live in the top-level `server/` and `clients/` folders of the app directory (the project
root), not in the installed `fedsb` package: they import `fedsb`, so `fedsb` cannot import them.
Flower loads them from the app directory, reading `[tool.flwr.app.components]` in its
pyproject.toml and importing with that directory first on `sys.path`; the in-process engine
(`fedsb.federation.inprocess`) loads them here by the same rule, so both run the same files.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def project_dir() -> Path:
    """The Flower app directory: the fedsb project root (where pyproject.toml has [tool.flwr.app])."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{root} has no pyproject.toml: install fedsb from a clone with "
                                "`pip install -e .`, or pass --app DIR")
    return root


def app_components(app_dir: str | Path) -> dict[str, str]:
    """`serverapp` and `clientapp` references ("module:attribute") of the app in app_dir."""
    pyproject = Path(app_dir) / "pyproject.toml"
    with pyproject.open("rb") as file:
        components = tomllib.load(file).get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    missing = [key for key in ("serverapp", "clientapp") if key not in components]
    if missing:
        raise ValueError(f"{pyproject}: [tool.flwr.app.components] has no {', '.join(missing)}")
    return components


def load_component(app_dir: str | Path, reference: str) -> Any:
    """The object `reference` ("module:attribute") names, imported from app_dir as Flower does."""
    module_name, _, attribute = reference.partition(":")
    directory = str(Path(app_dir).resolve())
    if directory not in sys.path:
        sys.path.insert(0, directory)
    top = module_name.split(".")[0]
    loaded = sys.modules.get(top)
    origin = getattr(loaded, "__file__", None) or next(iter(getattr(loaded, "__path__", [])), None)
    if origin and not Path(origin).resolve().is_relative_to(directory):
        raise ImportError(f"{reference}: a module named {top!r} is already loaded from {origin}, "
                          f"not from the app directory {directory}")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


def load_client_app(app_dir: str | Path) -> Any:
    """The app's ClientApp."""
    return load_component(app_dir, app_components(app_dir)["clientapp"])


def load_server_runner(app_dir: str | Path) -> Any:
    """`run_server(grid, run_config) -> ServerRun` from the ServerApp's module: the whole run the
    ServerApp's main runs, returning what it produced (the in-process engine's result)."""
    module = load_component(app_dir, app_components(app_dir)["serverapp"].partition(":")[0])
    return module.run_server
