"""Confidence intervals over seeds (Student's t) and the three-way reading of a claim."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95
HOLDS, DOES_NOT_HOLD, UNDECIDED = "holds", "does not hold", "undecided"


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided confidence interval at LEVEL (low == high == mean with one value)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided Student t quantile (e.g. 2.776 for df 4 at 95%), from scipy (an Opacus dependency)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval | None:
    """Mean ± t_{df = n-1} * s / sqrt(n); None for no values; a point for one value (no spread known)."""
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Interval(mean, mean, mean, 1)
    half = t_quantile(len(values) - 1, level) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def verdict(interval: Interval | None, threshold: float = 0.0) -> str:
    """holds (the interval above `threshold`), does not hold (below), undecided (it straddles it,
    or fewer than two seeds)."""
    if interval is None or interval.n < 2:
        return UNDECIDED
    if interval.low > threshold:
        return HOLDS
    if interval.high < threshold:
        return DOES_NOT_HOLD
    return UNDECIDED


def interval_text(interval: Interval | None, digits: int = 3, signed: bool = False) -> str:
    """'0.842 [0.836, 0.848]' ('+0.012 [+0.004, +0.020]' signed); one value: '0.842 (1 seed)'."""
    if interval is None:
        return "–"
    sign = "+" if signed else ""
    if interval.n < 2:
        return f"{interval.mean:{sign}.{digits}f} (1 seed)"
    return (f"{interval.mean:{sign}.{digits}f} [{interval.low:{sign}.{digits}f}, "
            f"{interval.high:{sign}.{digits}f}]")
