"""The documentation stays true to the code and to itself: the config reference is the generator's
output, the README stays a short quick start with CI's exact test command, every relative link
resolves, and no page carries notes that belong to one machine or one stretch of work."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEST_COMMAND = 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q && ruff check .'
README_MAX_LINES = 150

# Directories whose Markdown is not the project's own prose: study outputs, run outputs, tool caches.
SKIPPED_DIRS = {"results", "runs", "outputs", "build", "dist", "node_modules"}
# Reports written by `fedsb plot` before study outputs named no machine's paths; regenerating them
# (fedsb plot) removes the absolute base-config path they hold.
# Work notes, and the absolute path of this checkout (a path of one machine).
FORBIDDEN = [re.compile(p, re.IGNORECASE) for p in (r"session", r"issue #", r"\bissue \d",
                                                     re.escape(str(ROOT)))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def load_config_reference():
    script = ROOT / "scripts" / "config_reference.py"
    spec = importlib.util.spec_from_file_location("config_reference", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def markdown_files() -> list[Path]:
    found = []
    for path in sorted(ROOT.rglob("*.md")):
        parts = path.relative_to(ROOT).parts[:-1]
        if any(p.startswith(".") or p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts):
            continue
        found.append(path)
    return found


def relative_links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor on the same page
        targets.append(target.split("#", 1)[0])
    return targets


def test_the_config_reference_is_the_generators_output():
    expected = load_config_reference().render()
    actual = (ROOT / "docs" / "config.md").read_text()
    assert actual == expected, "docs/config.md is stale: python scripts/config_reference.py > docs/config.md"


def test_the_config_reference_lists_every_key():
    from fedsb.experiment.config import ExperimentConfig, flatten

    page = (ROOT / "docs" / "config.md").read_text()
    for key in flatten(ExperimentConfig().to_dict()):
        assert f"| `{key}` |" in page, key


def test_the_readme_is_a_short_quick_start_with_cis_test_command():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert TEST_COMMAND in text  # .ci/run runs this exact command
    assert 'python -m pytest -q -m "not slow"' in text


def test_every_relative_link_points_to_a_file():
    pages = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in pages for target in relative_links(page)
              if not (page.parent / target).exists()]
    assert not broken, broken


def test_the_link_checker_sees_links_and_skips_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('[a](a.md#x) ![b](img/b.png "title") [c](https://example.org) [d](#here)\n'
                    "`[e](e.md)`\n```\n[f](f.md)\n```\n")
    assert relative_links(page) == ["a.md", "img/b.png"]


def test_no_page_carries_notes_of_one_machine_or_one_stretch_of_work():
    found = []
    for path in markdown_files():
        relative = path.relative_to(ROOT).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{relative}:{number}: {p.pattern}" for p in FORBIDDEN if p.search(line)]
    assert not found, found
