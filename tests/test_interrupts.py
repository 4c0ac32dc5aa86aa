"""Ctrl-C, SIGTERM and errors stop every process fedsb started (fedsb.ops.interrupts,
fedsb.ops.processes), and an interrupted sweep cell is recorded as `interrupted` and rerun.

Fast tests: the signal handling itself, finding a launch's processes by its tag (also those whose
environment does not show it), and the sweep's bookkeeping with a fake runner. Slow tests start
`fedsb run`, `fedsb sweep` and `fedsb deploy-local` as subprocesses in their own sessions, signal
them once a round has started (or the run was submitted), and check that nothing of theirs is
left: no process in their session, none whose environment or command line holds their unique
temporary directory, and none of the processes seen (with their sessions and descendants) while
they ran. Other runs' Flower and Ray processes on the machine are never looked at.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_sweep import FakeRunner, read_csv, write_sweep

from fedsb.analysis.sweep.runner import CellInterrupted, run_sweep
from fedsb.analysis.sweep.table import COMPLETED, INTERRUPTED
from fedsb.ops.interrupts import Interrupted, deferred, exit_status, handle_interrupts
from fedsb.ops.processes import TAG_ENV, find_tagged, new_tag, stop_tagged, tagged_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
needs_flower = pytest.mark.skipif(shutil.which("flower-superlink") is None,
                                  reason="the flwr commands (flower-superlink, ...) are not installed")
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


# --- the signal handling ------------------------------------------------------------------------------

def _signal_self(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.5)  # the handler runs in the main thread at the next bytecode


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_raises_interrupted_and_later_ones_are_ignored(sig, status):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught, handle_interrupts():
        try:
            _signal_self(sig)
        finally:
            _signal_self(sig)  # during the clean-up: reported, not raised
            cleaned = True
    assert cleaned and caught.value.signum == sig and caught.value.exit_status == status
    assert exit_status(caught.value) == status and exit_status(KeyboardInterrupt()) == 130
    assert isinstance(caught.value, KeyboardInterrupt) and not isinstance(caught.value, Exception)
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_a_signal_inside_a_deferred_block_is_raised_when_the_block_ends():
    steps = []
    with pytest.raises(Interrupted), handle_interrupts():
        with deferred():
            _signal_self(signal.SIGTERM)
            steps.append("clean-up finished")
        steps.append("not reached")
    assert steps == ["clean-up finished"]


# --- finding a launch's processes ----------------------------------------------------------------------

# A session leader with the tag, a child without it (as a Ray worker whose process title overwrote
# its environment), and a grandchild that starts a session of its own (as the SuperExec does).
TREE = """
import os, subprocess, sys, time
env = {k: v for k, v in os.environ.items() if k != "TAG_ENV"}
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)
print("ready", flush=True)
time.sleep(60)
""".replace("TAG_ENV", TAG_ENV)


@needs_proc
def test_stop_tagged_finds_the_tagged_their_sessions_and_descendants_and_nothing_else():
    tag = new_tag()
    leader = subprocess.Popen([sys.executable, "-c", TREE], env=tagged_env(os.environ, tag),
                              start_new_session=True, stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env=tagged_env(os.environ, new_tag()), start_new_session=True)
    try:
        assert leader.stdout.readline().strip() == "ready"
        found = find_tagged(tag)
        assert leader.pid in found and len(found) == 3, found
        assert other.pid not in found and os.getpid() not in found
        stopped = stop_tagged(tag, grace_s=2.0)
        assert set(found) <= set(stopped)
        leader.wait(timeout=10)
        assert find_tagged(tag) == [] and other.poll() is None
        for pid in found:
            if pid != leader.pid:
                assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    finally:
        for p in (leader, other):
            if p.poll() is None:
                p.kill()
                p.wait()


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


# --- the sweep's bookkeeping ---------------------------------------------------------------------------

class InterruptingRunner(FakeRunner):
    """A cell with method.rank == 8 is interrupted by SIGTERM while its run is going."""

    def __call__(self, config_path, overrides, **kwargs):
        if overrides.get("method.rank") == 8:
            self.calls.append(dict(overrides))
            raise Interrupted(signal.SIGTERM)
        return super().__call__(config_path, overrides, **kwargs)


def test_an_interrupted_cell_is_recorded_the_sweep_stops_and_the_next_sweep_reruns_it(tmp_path):
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", {"method.rank": [4, 8, 12]}, output_dir=out)
    runner, lines = InterruptingRunner(), []
    with pytest.raises(CellInterrupted) as caught:
        run_sweep(path, runner=runner, echo=lines.append)
    assert caught.value.signum == signal.SIGTERM and exit_status(caught.value) == 143
    assert [c["method.rank"] for c in runner.calls] == [4, 8]  # the sweep stopped at the interrupted cell
    rows = read_csv(out / "sweep.csv")
    assert [(r["method.rank"], r["status"]) for r in rows] == [("4", COMPLETED), ("8", INTERRUPTED)]
    assert rows[1]["error"] == "interrupted by SIGTERM" and rows[1]["finished_at"]
    assert any("interrupted: method.rank=8" in line for line in lines)

    again = FakeRunner()
    result = run_sweep(path, runner=again, echo=lines.append)
    assert [c.label for c in result.skipped] == ["method.rank=4"]
    assert [c["method.rank"] for c in again.calls] == [8, 12]
    latest = {r["method.rank"]: r["status"] for r in read_csv(out / "sweep.csv")}
    assert latest == {"4": COMPLETED, "8": COMPLETED, "12": COMPLETED}


def test_fedsb_sweep_exits_with_128_plus_the_signal(tmp_path, monkeypatch):
    import fedsb.analysis.sweep.cli as sweep_cli
    from fedsb.cli import main

    def interrupted(*args, **kwargs):
        raise CellInterrupted({"error": "interrupted by SIGTERM"}, signal.SIGTERM)

    monkeypatch.setattr(sweep_cli, "run_sweep", interrupted)
    path = write_sweep(tmp_path / "s.yaml", {"method.rank": [4]})
    assert main(["sweep", str(path)]) == 143


# --- real processes ------------------------------------------------------------------------------------

def _proc_info(pid: int) -> tuple[int, int, str] | None:
    """(session id, parent pid, start time) of a live process, None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[3]), int(fields[1]), fields[19]


def _theirs(marker: str, session: int) -> dict[int, str]:
    """Live processes in `session`, or whose environment or command line holds `marker`, with the
    sessions and descendants of those (pid -> start time)."""
    marker_bytes = marker.encode()
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            info = _proc_info(int(entry.name))
            if info:
                table[int(entry.name)] = info
    found, sessions = set(), {session}
    for pid in table:
        try:
            text = Path(f"/proc/{pid}/environ").read_bytes() + Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker_bytes in text:
            found.add(pid)
            sessions.add(table[pid][0])
    sessions.discard(os.getsid(0))
    found |= {pid for pid, (sid, _ppid, _start) in table.items() if sid in sessions}
    grew = True
    while grew:
        more = {pid for pid, (_sid, ppid, _start) in table.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return {pid: table[pid][2] for pid in found}


def _left(seen: dict[int, str], marker: str, session: int) -> list[str]:
    """What is still running of `seen` (same pid and start time) or of `_theirs` now."""
    alive = {pid for pid, start in seen.items() if (info := _proc_info(pid)) and info[2] == start}
    alive |= set(_theirs(marker, session))
    return [f"{pid}: {_cmdline(pid)}" for pid in sorted(alive) if _proc_info(pid)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:150]
    except OSError:
        return "?"


@pytest.fixture
def marker():
    """A new directory of the test's own, with a short path (Ray puts its AF_UNIX sockets, at most 107
    bytes long, under TMPDIR): the TMPDIR of the command under test, the marker all its processes carry."""
    path = Path(tempfile.mkdtemp(prefix="fedsb-sig-", dir="/tmp" if Path("/tmp").is_dir() else None))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _start(argv: list[str], tmp_path: Path, marker: Path) -> tuple[subprocess.Popen, Path, str]:
    """`python -m fedsb.cli ARGV` in its own session, with TMPDIR `marker`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TMPDIR": str(marker), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "fedsb.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedsb.cli", *argv], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path,
                                start_new_session=True)
    return proc, log, str(marker)


def _wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"exited with {proc.returncode} before {text!r}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout:.0f} s:\n{log.read_text()}"
        time.sleep(0.5)


def _interrupt_and_check(proc: subprocess.Popen, log: Path, marker: str, sig: int, *, group: bool,
                         timeout: float = 60) -> str:
    """Send `sig` (to the whole process group, as Ctrl-C in a terminal does, with `group`), wait for
    the exit, and assert that nothing of the command's is left. Returns its output."""
    seen = _theirs(marker, proc.pid)
    assert len(seen) >= 5, seen  # fedsb, the SuperLink, its SuperExec, the simulation, Ray's...
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=timeout)
        time.sleep(1.0)
        output = log.read_text(errors="replace")
        left = _left(seen, marker, proc.pid)
        assert left == [], "\n".join(left) + "\n" + output[-3000:]
        return output
    finally:  # never leave this test's processes behind, whatever failed
        for pid, start in {**seen, **_theirs(marker, proc.pid)}.items():
            info = _proc_info(pid)
            if info and info[2] == start:  # the same process, not a new one with its pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(timeout=10)


@pytest.mark.slow
@needs_flower
@needs_proc
def test_fedsb_run_stops_everything_on_sigterm(tmp_path, marker):
    proc, log, marker = _start(["run", str(TINY), "--set", "federation.rounds=300",
                                "--set", f"output_dir={tmp_path / 'runs'}"], tmp_path, marker)
    _wait_for(proc, log, "[ROUND 1/", timeout=90)
    output = _interrupt_and_check(proc, log, marker, signal.SIGTERM, group=False)
    assert proc.returncode == 143, output
    assert "interrupted (SIGTERM)" in output


@pytest.mark.slow
@needs_flower
@needs_proc
def test_fedsb_sweep_stops_everything_on_ctrl_c_records_the_cell_and_reruns_it(tmp_path, marker):
    out = tmp_path / "sweep"
    path = write_sweep(tmp_path / "s.yaml", {"method.name": ["fedsb", "ffa"]},
                       fixed={"federation.rounds": 300}, output_dir=out)
    proc, log, marker = _start(["sweep", str(path), "--stream"], tmp_path, marker)
    _wait_for(proc, log, "[ROUND 1/", timeout=90)
    output = _interrupt_and_check(proc, log, marker, signal.SIGINT, group=True)
    assert proc.returncode == 130, output
    rows = read_csv(out / "sweep.csv")
    assert [(r["method.name"], r["status"]) for r in rows] == [("fedsb", INTERRUPTED)], output
    assert rows[0]["error"] == "interrupted by SIGINT"

    runner = FakeRunner()  # the next sweep reruns the interrupted cell, then the rest
    result = run_sweep(path, runner=runner, echo=lambda line: None)
    assert [c["method.name"] for c in runner.calls] == ["fedsb", "ffa"] and result.skipped == []


@pytest.mark.slow
@needs_flower
@needs_proc
def test_fedsb_deploy_local_stops_everything_on_ctrl_c_during_the_run(tmp_path, marker):
    workdir = tmp_path / "deploy"
    proc, log, marker = _start(["deploy-local", "--nodes", "1", "--no-tls", "--workdir", str(workdir),
                                "--config", str(TINY), "--set", "num-rounds=300"], tmp_path, marker)
    _wait_for(proc, log, "[ROUND 1/", timeout=90)
    output = _interrupt_and_check(proc, log, marker, signal.SIGINT, group=True)
    assert proc.returncode == 130, output
    assert "interrupted; every started process was stopped" in output
