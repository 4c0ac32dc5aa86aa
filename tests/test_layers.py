"""The import rule of docs/architecture.md section 1, read from the document itself: each layer of
`fedsb/` imports only its own and the layers listed above it; nothing in `fedsb/` imports the
Flower apps (`server/`, `clients/`), which import `fedsb`; and the apps are not installed as
top-level packages, so fedsb imports nothing of those names from site-packages."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APPS = ("server", "clients")


def documented_layers() -> list[str]:
    """The layers in the order of the architecture's code block (lowest first)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## 1. The layers", 1)[1].split("```", 2)[1]
    names = re.findall(r"^  (\w+)(?:/|\.py)\s", block, flags=re.MULTILINE)
    assert names and len(names) == len(set(names)), names
    return names


def imported_modules(path: Path, root: Path = ROOT) -> list[str]:
    """Every module a file imports, at the top or inside a function; relative imports resolved."""
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            modules += [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
    return modules


def layer_of(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root / "fedsb").parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def upward_imports(layers: list[str], root: Path = ROOT) -> list[str]:
    """Each import in root/fedsb of a higher layer or of a Flower app, as 'file imports module (why)'."""
    rank = {name: i for i, name in enumerate(layers)}
    found = []
    for path in sorted((root / "fedsb").rglob("*.py")):
        own = layer_of(path, root)
        if own == "__init__":
            continue
        for module in imported_modules(path, root):
            parts = module.split(".")
            where = f"{path.relative_to(root)} imports {module}"
            if parts[0] in APPS:
                found.append(f"{where} (a Flower app)")
            elif parts[0] == "fedsb" and len(parts) > 1 and parts[1] in rank and rank[parts[1]] > rank[own]:
                found.append(f"{where} ({parts[1]} is above {own})")
    return found


def test_the_documented_layers_cover_every_part_of_fedsb():
    layers = documented_layers()
    assert layers[:3] == ["core", "methods", "data"] and "cli" in layers
    parts = {layer_of(path) for path in (ROOT / "fedsb").rglob("*.py")} - {"__init__"}
    assert parts == set(layers), f"undocumented: {parts - set(layers)}; gone: {set(layers) - parts}"


def test_no_module_imports_a_higher_layer_or_the_apps():
    found = upward_imports(documented_layers())
    assert not found, "\n".join(found)


def test_the_rule_finds_upward_imports_written_any_way(tmp_path):
    """The checker itself, on a tree of its own: lazy, relative and absolute upward imports are found,
    a downward one is not."""
    (tmp_path / "fedsb" / "core").mkdir(parents=True)
    (tmp_path / "fedsb" / "experiment").mkdir()
    (tmp_path / "fedsb" / "core" / "probe.py").write_text(
        "def f():\n    from ..experiment import config\n    import server.app\n")
    (tmp_path / "fedsb" / "experiment" / "fine.py").write_text("from fedsb.core import probe\n")
    assert imported_modules(tmp_path / "fedsb" / "core" / "probe.py", tmp_path) == [
        "fedsb.experiment", "server.app"]
    assert upward_imports(["core", "experiment"], tmp_path) == [
        "fedsb/core/probe.py imports fedsb.experiment (experiment is above core)",
        "fedsb/core/probe.py imports server.app (a Flower app)"]


def test_the_apps_are_not_installed_and_fedsb_runs_without_them(tmp_path):
    """From a directory outside the project, with nothing added to the path: no top-level `server` or
    `clients` package can be imported, and fedsb's engines import without them (they load the apps
    from the app directory when a run starts)."""
    code = ("import importlib.util, sys\n"
            "found = [n for n in ('server', 'clients') if importlib.util.find_spec(n)]\n"
            "import fedsb.cli, fedsb.ops.launch, fedsb.federation.inprocess\n"
            "loaded = [n for n in ('server', 'clients') if n in sys.modules]\n"
            "print(found, loaded)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []"
