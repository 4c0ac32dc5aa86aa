"""The run's checkpoint: everything the server needs to continue a stopped run where it stopped.

After every round the server writes, under `run_dir/checkpoint/`:

    state-r<N>.safetensors    the global state after round N
    chosen-r<M>.safetensors   the state of the round chosen so far on validation (M <= N)
    server.json               round N, the clients that hold the one-time tensors, the privacy
                              ledgers (the server's copy and each client's own, to restore it)

The rounds' metrics and the meter's entries are not copied here: metrics.jsonl and comm.csv already
hold them, written before the checkpoint, and a resume reads them back through round N.

`server.json` is written last, by write-then-rename, and names the state files it goes with, so a
crash at any moment leaves the previous checkpoint whole. What clients keep between rounds is not
stored: their one-time tensors are sent again on resume (metered apart, in `resume.csv`, so that
`comm.csv` stays the uninterrupted run's), and their privacy ledgers travel back from server.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where tensors are read or written: `fedsb run --resume` checks without it
    from fedsb.core.adapters import State

CHECKPOINT_DIR = "checkpoint"
SERVER_FILE = "server.json"
VERSION = 1


class CheckpointError(RuntimeError):
    """No usable checkpoint (or one from another config) where a resume expects one."""


@dataclass
class ServerCheckpoint:
    round: int  # rounds completed
    chosen_round: int | None  # the round chosen on validation so far
    seen: list[int]  # clients that hold the one-time tensors (before the stop)
    ledgers: dict[str, dict[str, float]] = field(default_factory=dict)  # the server's copy, by client
    client_ledgers: dict[str, str] = field(default_factory=dict)  # each client's own ledger (JSON)
    version: int = VERSION

    @property
    def state_file(self) -> str:
        return f"state-r{self.round}.safetensors"

    @property
    def chosen_file(self) -> str | None:
        return None if self.chosen_round is None else f"chosen-r{self.chosen_round}.safetensors"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, checkpoint: ServerCheckpoint, state: State,
                    chosen: State | None) -> None:
    """Write the round's state files, then server.json naming them, then drop older state files."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    directory.mkdir(exist_ok=True)
    _save_tensors(directory / checkpoint.state_file, state)
    if chosen is not None and checkpoint.chosen_file and not (directory / checkpoint.chosen_file).exists():
        _save_tensors(directory / checkpoint.chosen_file, chosen)
    _write_atomic(directory / SERVER_FILE, json.dumps(asdict(checkpoint)))
    keep = {checkpoint.state_file, checkpoint.chosen_file, SERVER_FILE}
    for path in directory.glob("*.safetensors"):
        if path.name not in keep:
            path.unlink()


def _save_tensors(path: Path, state: State) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / SERVER_FILE).is_file()


def read_checkpoint(run_dir: str | Path) -> ServerCheckpoint:
    """The last checkpoint's record (which round, which clients; no tensors)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not has_checkpoint(run_dir):
        raise CheckpointError(f"{run_dir} has no checkpoint ({CHECKPOINT_DIR}/{SERVER_FILE}): "
                              "nothing to resume")
    checkpoint = ServerCheckpoint(**json.loads((directory / SERVER_FILE).read_text()))
    if checkpoint.version != VERSION:
        raise CheckpointError(f"{run_dir}: checkpoint version {checkpoint.version}; "
                              f"this fedsb reads version {VERSION}")
    return checkpoint


def load_checkpoint(run_dir: str | Path) -> tuple[ServerCheckpoint, State, State | None]:
    """The last checkpoint of run_dir: its record, the global state, and the chosen round's state."""
    from safetensors.torch import load_file

    directory = Path(run_dir) / CHECKPOINT_DIR
    checkpoint = read_checkpoint(run_dir)
    state = load_file(str(directory / checkpoint.state_file))
    chosen = load_file(str(directory / checkpoint.chosen_file)) if checkpoint.chosen_file else None
    return checkpoint, state, chosen
