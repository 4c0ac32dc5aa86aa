"""The communication meter: the size of every array the Flower messages really carried.

The Flower apps call `Meter.record` with the sizes of each message's arrays (see
`fedsb.federation.protocol.meter_message`); the closed forms of `fedsb.experiment.comm`
predict the same payload bytes, and the tests compare the two to the byte.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIRECTIONS = ("up", "down")
INIT = "init"  # the component name of one-time traffic (LoRA-SB's B and A, FFA's A, init gradients)

PHASES = ("init", "train", "evaluate")  # what a message was for (closed forms describe `train` and init)
CSV_FIELDS = ("round", "client", "phase", "direction", "component", "params", "bytes", "wire_bytes")


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; accepted: {', '.join(DIRECTIONS)}")


@dataclass(frozen=True)
class MeterEntry:
    """One component of one message: `bytes` = elements x itemsize (the payload, what the closed
    form counts); `wire_bytes` = the serialised array record entries (.npy bytes + key)."""

    round: int
    client: int  # partition id
    phase: str
    direction: str
    component: str
    params: int
    bytes: int
    wire_bytes: int


class Meter:
    """Records the size of every array sent down and up, per round, client, phase and component.

    The Flower apps call `record` with the sizes of each message's arrays; `fedsb` never sees
    the messages themselves. Everything else here is arithmetic over the recorded entries.
    """

    def __init__(self) -> None:
        self.entries: list[MeterEntry] = []

    def record(self, round: int, client: int, phase: str, direction: str, component: str,
               params: int, nbytes: int, wire_bytes: int) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; accepted: {', '.join(PHASES)}")
        check_direction(direction)
        self.entries.append(
            MeterEntry(round, client, phase, direction, component, params, nbytes, wire_bytes))

    def select(self, **where: Any) -> list[MeterEntry]:
        """Entries whose fields equal the given values, e.g. select(round=2, direction="up")."""
        return [e for e in self.entries if all(getattr(e, k) == v for k, v in where.items())]

    def total(self, field_name: str = "bytes", **where: Any) -> int:
        return sum(getattr(e, field_name) for e in self.select(**where))

    def by_component(self, field_name: str = "bytes", **where: Any) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.select(**where):
            out[e.component] = out.get(e.component, 0) + getattr(e, field_name)
        return out

    def client_components(self, round: int, client: int, direction: str, phase: str = "train"
                          ) -> dict[str, int]:
        """Payload bytes per component of one client's message in one round (what the closed
        form's `component_bytes(direction, first_time=...)` predicts)."""
        return self.by_component(round=round, client=client, direction=direction, phase=phase)

    def rows(self, round: int | None = None) -> list[dict[str, Any]]:
        entries = self.entries if round is None else self.select(round=round)
        return [dataclasses.asdict(e) for e in entries]

    def summary(self) -> dict[str, Any]:
        """Totals by direction (payload and wire bytes, parameters) and by component."""
        out: dict[str, Any] = {}
        for d in DIRECTIONS:
            out[d] = {"bytes": self.total("bytes", direction=d),
                      "wire_bytes": self.total("wire_bytes", direction=d),
                      "params": self.total("params", direction=d),
                      "bytes_by_component": self.by_component("bytes", direction=d),
                      "params_by_component": self.by_component("params", direction=d)}
        return out


def read_comm_csv(path: str | Path) -> list[MeterEntry]:
    """The entries a run's comm.csv holds (what `RunRecorder` wrote from the meter), in order."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [MeterEntry(int(r["round"]), int(r["client"]), r["phase"], r["direction"], r["component"],
                       int(r["params"]), int(r["bytes"]), int(r["wire_bytes"])) for r in rows]
