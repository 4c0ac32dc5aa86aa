"""Reproducible choices made from the seed: each round's cohort, each client step's seed."""

from __future__ import annotations

import random


def sample_clients(client_ids: list[int], count: int, seed: int, server_round: int) -> list[int]:
    """A reproducible cohort: depends only on the ids, the seed and the round."""
    rng = random.Random(f"fedsb-cohort-{seed}-{server_round}")
    return sorted(rng.sample(sorted(client_ids), min(count, len(client_ids))))


def hash_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (Python's hash() of str is salted per process)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**31 - 1)
    return value
