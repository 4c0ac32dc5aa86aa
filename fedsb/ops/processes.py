"""The local processes fedsb starts for Flower: free ports, starting a command with its output in a
log file, waiting until it serves, and stopping it with everything it spawned.

One implementation for `fedsb run` (fedsb.ops.launch: a simulation SuperLink) and for the local
deployment (fedsb.ops.deploy.local: a SuperLink, SuperNodes and SuperExecs). Every command is
started in its own session, so it leads a process group that also holds what it spawns (a
SuperExec's app processes, say); stopping signals the whole group, SIGTERM then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PORT_RANGE = (41000, 41999)  # the local deployment's ports

Echo = Callable[[str], None]


class ProcessError(RuntimeError):
    """A process could not start, serve or be reached; the message points at its log."""


# ---------------------------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------------------------

def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def free_ports(n: int, port_range: tuple[int, int] | None = PORT_RANGE,
               exclude: Iterable[int] = ()) -> list[int]:
    """n distinct ports that are free on 127.0.0.1 now.

    With `port_range`, ports of that range in random order (so two deployments started at the same
    time rarely pick the same ones); with None, ports the OS hands out from its ephemeral range.
    """
    excluded = set(exclude)
    if port_range is None:
        with contextlib.ExitStack() as held:  # keep each socket bound until all n are found: distinct
            found: list[int] = []
            while len(found) < n:
                s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
                if port not in excluded:
                    found.append(port)
            return found
    candidates = [p for p in range(port_range[0], port_range[1] + 1) if p not in excluded]
    random.SystemRandom().shuffle(candidates)
    found = []
    for port in candidates:
        if port_is_free(port):
            found.append(port)
            if len(found) == n:
                return found
    raise ProcessError(f"fewer than {n} free ports in {port_range[0]}-{port_range[1]}")


# ---------------------------------------------------------------------------------------------
# Starting and waiting
# ---------------------------------------------------------------------------------------------

@dataclass
class ManagedProcess:
    """A command started by `spawn`: the leader of its own process group, output in `log`."""

    name: str
    argv: list[str]
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None if it is still running after `timeout` seconds."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def spawn(name: str, argv: list[str], *, log: Path, cwd: Path, env: Mapping[str, str]) -> ManagedProcess:
    """Start `argv` in its own session (a new process group), stdin closed, stdout and stderr
    appended to `log`."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=dict(env), start_new_session=True)
    return ManagedProcess(name, argv, proc, log)


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file ('' if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until(mp: ManagedProcess, ready: Callable[[], bool], timeout: float, state: str,
               what: str | None = None, interval: float = 0.2) -> None:
    """Poll `ready()` until it is true. ProcessError if the process exits first ("... exited with
    code C before it was {state}") or `timeout` seconds pass."""
    what = what or mp.name
    deadline = time.monotonic() + timeout
    while not ready():
        if mp.proc.poll() is not None:
            raise ProcessError(f"{what} exited with code {mp.proc.returncode} before it was {state}; "
                               f"see {mp.log}:\n{tail(mp.log)}")
        if time.monotonic() > deadline:
            raise ProcessError(f"{what} was not {state} after {timeout:.0f} s; see {mp.log}")
        time.sleep(interval)


def wait_for_port(mp: ManagedProcess, port: int, timeout: float, what: str | None = None) -> None:
    """Wait until the process listens on 127.0.0.1:`port`."""
    wait_until(mp, lambda: port_is_open(port), timeout, f"listening on port {port}", what)


# ---------------------------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------------------------

def signal_group(process: subprocess.Popen, sig: int) -> None:
    """Signal a process started in its own session and everything in its group (the group holds
    what it spawned, even after the leader exits)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def stop_processes(procs: Sequence[ManagedProcess], grace_s: float = 8.0, echo: Echo | None = None) -> None:
    """SIGTERM every process group (last started first), wait up to `grace_s` seconds for them all,
    then SIGKILL what is left of each group, and reap everything."""
    for mp in reversed(procs):
        signal_group(mp.proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for mp in reversed(procs):
        try:
            mp.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if echo:
                echo(f"{mp.name} (pid {mp.pid}) ignored SIGTERM for {grace_s:.0f} s: SIGKILL")
        # the group may outlive its leader: always finish it off
        signal_group(mp.proc, signal.SIGKILL)
        try:
            mp.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
            if echo:
                echo(f"{mp.name} (pid {mp.pid}) is still there after SIGKILL")
