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


@pytest.mark.parametrize("extra", [
    {"method": "fedsb"}, {"method": "ffa", "privacy-epsilon": 3},
    {"method": "fedsb", "privacy-epsilon": 3,  # the private init's charge must survive the stop too
     "overrides": "federation.rounds=3; federation.clients_per_round=0.5; method.init.source=clients"},
], ids=["fedsb", "ffa-dp", "fedsb-dp-client-init"])
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


def test_fedsb_run_resume_refuses_a_changed_config_and_a_finished_run(tmp_path, capsys):
    from fedsb.cli import main

    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        run_in_process({"config": TINY, "run-dir": str(run_dir), "overrides": "federation.rounds=3"},
                       tamper=crash_in_round(2))
    changed = ["--set", "federation.rounds=3", "--set", "train.lr=0.5"]
    assert main(["run", TINY, "--resume", str(run_dir), *changed]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fedsb run: error: --resume {run_dir}: train.lr is 0.5 here but 0.01 in the run; resume "
                   "with the run's own config")
    finished = tmp_path / "finished"
    run_in_process({"config": TINY, "run-dir": str(finished)})
    assert main(["run", "--resume", str(finished)]) == 0
    assert "has finished (summary.json); nothing to resume" in capsys.readouterr().out


@pytest.mark.slow
def test_a_killed_flwr_run_resumes_with_fedsb_run_resume(tmp_path):
    """The real path: `fedsb run` of 3 rounds, its whole process group killed once round 1 is
    checkpointed (as a crash would), then `fedsb run --resume`: the same adapter file, byte for byte,
    as the uninterrupted run's (which the in-process grid gives, to the bit: test_flower_app.py)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # 12 rounds: after round 1 (its first, with the actors' start-up) a tiny round takes about 0.1 s, so
    # 3 rounds could end, summary and all, between two looks for round 1's checkpoint.
    overrides = ["--set", "federation.rounds=12", "--set", "federation.clients_per_round=0.5",
                 "--set", f"output_dir={tmp_path / 'runs'}"]
    import shutil
    import tempfile

    # Its temporary files (the private FLWR_HOME, Ray's session) in a directory of its own: how its
    # leftovers are found below. A short path: Ray's socket paths must fit in 107 characters.
    scratch = Path(tempfile.mkdtemp(prefix="fk", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "fedsb.cli", "run", TINY, "--quiet", *overrides],
                            start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 240
    run_dir = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "runs").glob("*/checkpoint/server.json"))
        if found and json.loads(found[0].read_text())["round"] >= 1:
            run_dir = found[0].parent.parent
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"fedsb run ended before it could be stopped: {proc.stdout.read()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the crash: fedsb, its SuperLink and the simulation at once
    proc.wait()
    _kill_leftovers(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    assert run_dir is not None, "no checkpoint of round 1 appeared"
    assert not (run_dir / "summary.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "fedsb.cli", "run", "--resume", str(run_dir), "--quiet"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    whole = tmp_path / "whole"
    run_in_process({"config": str(run_dir / "config.yaml"), "run-dir": str(whole)}, client_threads=1)
    assert outputs(run_dir) == outputs(whole)


def _kill_leftovers(scratch: Path) -> None:
    """The SuperLink and simulation started by the killed run run in their own sessions: stop the ones
    whose command line or environment names its scratch directory (never anything else here)."""
    import os
    import signal

    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(scratch) in cmdline or str(scratch) in environ:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
