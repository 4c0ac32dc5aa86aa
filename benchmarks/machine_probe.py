"""What the whole machine uses while a command runs: summed PSS and RSS of every process, CPU time.

Used by `benchmarks/simulation_overhead.py`. Memory is sampled every 0.5 s from
`/proc/PID/smaps_rollup` for every process (PSS splits pages shared between processes, such as
torch's libraries, among them, so the sum counts each page once); the figure reported is the peak
of the sum minus the sum before the command. CPU time is the machine's busy time from `/proc/stat`
over the command (on a quiet machine, the command's own). Linux only.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def summed_memory() -> tuple[int, int]:
    """(PSS, RSS) in bytes, summed over every process this user can read."""
    pss = rss = 0
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "smaps_rollup").read_text()
        except OSError:  # gone, a kernel thread, or not ours
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return pss, rss


def busy_cpu_seconds() -> float:
    """The machine's CPU time not idle (user, nice, system, irq, softirq, steal), in seconds."""
    fields = (PROC / "stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def process_table() -> list[tuple[int, int, str]]:
    """(PID, PSS bytes, command line) of every readable process, largest first."""
    rows = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            lines = (entry / "smaps_rollup").read_text().splitlines()
            pss = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("Pss:"))
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, StopIteration):
            continue
        rows.append((int(entry.name), pss, command[:100]))
    return sorted(rows, key=lambda row: -row[1])


@dataclass
class Usage:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_pss: int = 0  # above the machine's sum before the command
    peak_rss: int = 0
    peak_processes: list[tuple[int, int, str]] = field(default_factory=list)  # at the PSS peak
    marks: dict[str, float] = field(default_factory=dict)  # seconds at which the caller saw named steps


class MachineProbe:
    """`with MachineProbe() as usage: ...`; usage holds the command's wall, CPU and peak memory."""

    def __init__(self, interval_s: float = 0.5, table_at_peak: bool = True):
        self.interval_s = interval_s
        self.table_at_peak = table_at_peak
        self.usage = Usage()
        self._stop = threading.Event()

    def __enter__(self) -> Usage:
        self._base_pss, self._base_rss = summed_memory()
        self._cpu0, self._t0 = busy_cpu_seconds(), time.monotonic()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self.usage

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            pss, rss = summed_memory()
            if pss - self._base_pss > self.usage.peak_pss:
                self.usage.peak_pss = pss - self._base_pss
                if self.table_at_peak:
                    self.usage.peak_processes = process_table()
            self.usage.peak_rss = max(self.usage.peak_rss, rss - self._base_rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.usage.wall_s = time.monotonic() - self._t0
        self.usage.cpu_s = busy_cpu_seconds() - self._cpu0


def machine_line() -> str:
    """The machine and its load, for the top of a benchmark's output."""
    cores = os.cpu_count()
    memory_gb = int((PROC / "meminfo").read_text().split()[1]) / 2**20
    model = next((line.split(":", 1)[1].strip() for line in (PROC / "cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    load = " ".join((PROC / "loadavg").read_text().split()[:3])
    return f"{cores} cores ({model}), {memory_gb:.0f} GB; load average before: {load}"
