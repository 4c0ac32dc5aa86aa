"""Uncertainty over seeds, and the paired comparisons that decide a claim.

Each tuned setting's test accuracy is reported with a 95% confidence interval over its seeds
(Student's t, n - 1 degrees of freedom). Two settings of one context (the same grid values less
the method's own keys: e.g. the same partition and privacy budget) are compared seed by seed: a seed
fixes the data subsample, the partition, the cohorts and the init for every method run with it, so
the difference of two settings on one seed is free of the seed's own luck, and the interval of the
mean paired difference is much narrower than either setting's own.

A statement "A is more accurate than B" is read from the interval of the mean difference A - B:
**holds** when the whole interval is above 0, **does not hold** when it is below 0, **undecided**
when it contains 0. "A reaches B's accuracy" (non-inferiority, the Fed-SB paper's claim) is read
the same way against a stated margin: holds when the interval lies above -margin, does not hold when
it lies below -margin, undecided otherwise.

With `compare: {method.name: fedsb}` in the sweep file, the focus setting of each context is
compared with every other federated setting there; every federated setting is also compared with the
context's centralised reference (`federation.centralised: true`), when there is one.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsb.analysis.sweep.spec import format_value
from fedsb.analysis.sweep.stats import Interval, t_interval, verdict
from fedsb.analysis.sweep.table import csv_value
from fedsb.analysis.sweep.tuning import LABELLED_KEYS, TunedGroup

MARGIN = 0.01  # the non-inferiority margin, in accuracy: "reaches" means "not worse by more than this"
PAIRED_CSV = "paired.csv"
PAIRED_FIELDS = ("context", "kind", "a", "b", "seeds", "diff_mean", "diff_low", "diff_high",
                 "more_accurate", "reaches", "margin", "bytes_total_ratio")


@dataclass(frozen=True)
class PairedDifference:
    context: str  # the shared grid values, e.g. 'partition.scheme=iid' ('' when there are none)
    kind: str  # 'focus' (the compare setting against another) or 'reference' (against the centralised one)
    a: TunedGroup
    b: TunedGroup
    seeds: tuple[str, ...]  # the seeds both completed at their chosen values
    interval: Interval | None  # of the mean of a - b over those seeds

    @property
    def more_accurate(self) -> str:
        """'a is more accurate than b'."""
        return verdict(self.interval)

    @property
    def reaches(self) -> str:
        """'a reaches b's accuracy' (not worse by more than MARGIN)."""
        return verdict(self.interval, -MARGIN)

    @property
    def bytes_ratio(self) -> float | None:
        """a's total bytes over b's (means over seeds)."""
        a, b = self.a.bytes_total.mean, self.b.bytes_total.mean
        return a / b if a is not None and b else None


def context_of(group: TunedGroup, compare_keys: Sequence[str] = ()) -> str:
    """The grid values a group shares with the settings it is compared with."""
    own = set(LABELLED_KEYS) | set(compare_keys)
    return " ".join(f"{k}={v}" for k, v in group.grid.items() if k not in own)


def matches(group: TunedGroup, compare: Mapping[str, object]) -> bool:
    return not group.centralised and all(
        group.grid.get(k) == (v if isinstance(v, str) else format_value(v)) for k, v in compare.items())


def paired(a: TunedGroup, b: TunedGroup, context: str, kind: str) -> PairedDifference:
    seeds = tuple(s for s in a.test_by_seed if s in b.test_by_seed)
    diffs = [a.test_by_seed[s] - b.test_by_seed[s] for s in seeds]
    return PairedDifference(context, kind, a, b, seeds, t_interval(diffs))


def paired_differences(groups: Sequence[TunedGroup],
                       compare: Mapping[str, object] | None = None) -> list[PairedDifference]:
    """Per context: the focus setting (matching `compare`) against every other federated setting,
    then every federated setting against the centralised reference."""
    keys = list(compare or {})
    contexts: dict[str, list[TunedGroup]] = {}
    for group in groups:
        if group.chosen is not None:
            contexts.setdefault(context_of(group, keys), []).append(group)
    out = []
    for context, members in contexts.items():
        federated = [g for g in members if not g.centralised]
        if compare:
            for focus in (g for g in federated if matches(g, compare)):
                out += [paired(focus, other, context, "focus") for other in federated if other is not focus]
        for reference in (g for g in members if g.centralised):
            out += [paired(g, reference, context, "reference") for g in federated]
    return out


def paired_row(p: PairedDifference) -> dict[str, object]:
    i = p.interval
    return {"context": p.context, "kind": p.kind, "a": p.a.label, "b": p.b.label, "seeds": len(p.seeds),
            "diff_mean": i.mean if i else None, "diff_low": i.low if i else None,
            "diff_high": i.high if i else None, "more_accurate": p.more_accurate, "reaches": p.reaches,
            "margin": MARGIN, "bytes_total_ratio": p.bytes_ratio}


def write_paired(path: Path, pairs: Sequence[PairedDifference]) -> None:
    """paired.csv: one row per comparison."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, PAIRED_FIELDS)
        writer.writeheader()
        for p in pairs:
            writer.writerow({k: csv_value(v) for k, v in paired_row(p).items()})
