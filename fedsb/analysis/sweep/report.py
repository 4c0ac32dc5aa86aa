"""What `fedsb sweep` prints about results: a finished cell's line and the tuned table, and the number
formats they share with `fedsb plot`'s report.md."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedsb.analysis.sweep.compare import MARGIN, PairedDifference
from fedsb.analysis.sweep.stats import interval_text
from fedsb.analysis.sweep.table import COMPLETED
from fedsb.analysis.sweep.tuning import Stat, TunedGroup


def mean_std_text(stat: Stat, digits: int = 3) -> str:
    """'0.790 ± 0.012' (a single seed: '0.790'; nothing: '–')."""
    if stat.mean is None:
        return "–"
    return f"{stat.mean:.{digits}f}" + (f" ± {stat.std:.{digits}f}" if stat.std is not None else "")


def human_bytes(n: float | None) -> str:
    """Decimal units, as fedsb.experiment.comm.human_bytes (not imported here: it loads torch)."""
    if n is None or math.isnan(n):
        return "–"
    for factor, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{n:.0f} B"


def tuned_table(groups: Sequence[TunedGroup]) -> list[str]:
    """The tuned results as aligned text lines: a header and a line per group."""
    if not groups:
        return []
    header = ["group", groups[0].tune_key, "seeds", "val acc", "test acc [95% CI]",
              "final-round test acc [95% CI]", "bytes total"]
    rows = [[g.label, g.chosen.value if g.chosen else "–", str(g.seeds), mean_std_text(g.val_accuracy),
             interval_text(g.test_interval), interval_text(g.final_test_interval),
             human_bytes(g.bytes_total.mean)] for g in groups]
    return _aligned(header, rows)


def paired_table(pairs: Sequence[PairedDifference]) -> list[str]:
    """The paired differences as aligned text lines: a - b over the shared seeds, and what it decides."""
    header = ["context", "a", "b", "seeds", "a - b [95% CI]", "a more accurate",
              f"a reaches b (margin {MARGIN})", "bytes a/b"]
    rows = [[p.context or "–", p.a.label, p.b.label, str(len(p.seeds)),
             interval_text(p.interval, signed=True), p.more_accurate, p.reaches,
             "–" if p.bytes_ratio is None else f"{p.bytes_ratio:.3f}"]
            for p in pairs]
    return _aligned(header, rows)


def _aligned(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def cell_outcome(row: Mapping[str, Any]) -> str:
    """A finished cell's line: its status, accuracy and bytes, or why it failed."""
    if row["status"] == COMPLETED:
        def known(name: str) -> str:
            return str(row.get(name) or "?")

        total = row.get("bytes_total")
        return (f"done {row['cell']}: completed in {float(row['elapsed_s']):.0f} s, test accuracy "
                f"{known('test_accuracy')} at round {known('best_round')} (validation "
                f"{known('best_val_accuracy')}; final round: test {known('final_test_accuracy')}), "
                f"{int(total) if total else 0:,} B on the wire; run dir {row['run_dir']}")
    return f"FAILED {row['cell']}: {row['status']}: {row['error']}"
