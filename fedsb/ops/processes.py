"""The local processes fedsb starts for Flower: free ports, starting a command with its output in a
log file, waiting until it serves, and stopping it with everything it spawned.

One implementation for `fedsb run` (fedsb.ops.launch: a simulation SuperLink) and for the local
deployment (fedsb.ops.deploy.local: a SuperLink, SuperNodes and SuperExecs).

What is stopped, and how it is found:
- Every command fedsb starts (`spawn`) is started in its own session, so it leads a process group
  that also holds what it spawns; `stop_processes` signals the whole group, SIGTERM, a grace
  period, then SIGKILL.
- Some descendants leave that group: the SuperLink's SuperExec starts a session of its own
  (flwr 1.41), and the simulation it runs (`flwr-simulation`) with all of Ray's processes
  (gcs_server, raylet, the dashboard and runtime-env agents, `ray::ClientAppActor` workers) live
  in the SuperExec's session, re-parented to PID 1 once the SuperExec exits. `find_tagged` finds
  them: each launch gives its Flower processes a unique `FEDSB_PROCESS_TAG` (`new_tag`,
  `tagged_env`), which every descendant inherits (Ray passes its environment on to its daemons
  and workers), and /proc is walked for (1) processes whose environment holds exactly that tag,
  (2) every process in the session of one of those (except this process's own session), and
  (3) their descendants. (2) and (3) are needed because Ray's workers and agents set their
  process titles (`ray::DashboardAgent`), which can overwrite what /proc/PID/environ shows.
  `stop_tagged` sends them SIGTERM, waits, then SIGKILLs what is left (repeatedly, in case a
  dying parent started another). Nothing else is touched, so other users' and other runs'
  Flower and Ray processes are safe. On a system without /proc only the process groups are
  stopped.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PORT_RANGE = (41000, 41999)  # the local deployment's ports
TAG_ENV = "FEDSB_PROCESS_TAG"  # in the environment of every Flower process of one launch (see above)
PROC = Path("/proc")

Echo = Callable[[str], None]


def never_raising(echo: Echo | None) -> Echo:
    """`echo` that drops a message it cannot write (stdout a closed pipe or terminal): stopping
    processes must not fail halfway because the one watching the output went away."""
    def safe(message: str) -> None:
        if echo is not None:
            with contextlib.suppress(OSError, ValueError):  # BrokenPipeError, EIO; a closed file
                echo(message)
    return safe


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
    echo = never_raising(echo)
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


# ---------------------------------------------------------------------------------------------
# Processes that leave their process group: found by a tag in their environment
# ---------------------------------------------------------------------------------------------

def new_tag() -> str:
    """A tag no other launch has: this process's id and a random part."""
    return f"{os.getpid()}-{uuid.uuid4().hex}"


def tagged_env(env: Mapping[str, str], tag: str) -> dict[str, str]:
    """`env` with TAG_ENV set to `tag` (what each process started with it, and all it starts, carries)."""
    return {**env, TAG_ENV: tag}


def _stat(proc_root: Path, pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a live process; None if it is gone or a zombie."""
    try:
        stat = (proc_root / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[3])


def find_tagged(tag: str, proc_root: Path = PROC, sessions: set[int] | None = None) -> list[int]:
    """The live processes of the launch that carries `tag` (not this process), found three ways:
    their environment holds `TAG_ENV=tag` exactly; or they are in the session of such a process
    (other than this process's own session); or they descend from one of those. The latter two
    find Ray's workers and agents, which overwrite the memory /proc/PID/environ shows when they set
    their process titles (`ray::DashboardAgent`), but stay in the session of the SuperExec that
    started the simulation. `sessions`, if given, collects those session ids across calls, so that
    a session is still recognised after its tagged members are gone."""
    entry = f"{TAG_ENV}={tag}".encode()
    sessions = set() if sessions is None else sessions
    own = {os.getpid()}
    own_session = -1
    with contextlib.suppress(OSError):
        own_session = os.getsid(0)  # shared with the caller's other processes: never a launch's
    try:
        pids = [int(p.name) for p in proc_root.iterdir() if p.name.isdigit()]
    except OSError:  # no /proc: only the process groups can be stopped
        return []
    table = {pid: info for pid in pids if pid not in own and (info := _stat(proc_root, pid)) is not None}
    found = set()
    for pid, (_ppid, sid) in table.items():
        try:
            environ = (proc_root / str(pid) / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if entry in environ.split(b"\0"):
            found.add(pid)
            if sid != own_session:
                sessions.add(sid)
    found.update(pid for pid, (_ppid, sid) in table.items() if sid in sessions)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _sid) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return sorted(found)


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_tagged(tag: str, grace_s: float = 5.0, echo: Echo | None = None,
                proc_root: Path = PROC) -> list[int]:
    """Stop every process carrying `tag` (see the module docstring): SIGTERM, up to `grace_s`
    seconds for them to exit, then SIGKILL until none is left. The pids that were found."""
    echo = never_raising(echo)
    sessions: set[int] = set()
    pids = find_tagged(tag, proc_root, sessions)
    if not pids:
        return []
    seen = set(pids)
    _signal_pids(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = find_tagged(tag, proc_root, sessions)
        seen.update(pids)
    for _ in range(20):  # a dying parent (a raylet) may start another worker: repeat until none
        if not pids:
            break
        if echo:
            echo(f"SIGKILL to {len(pids)} process(es) still running after SIGTERM: {sorted(pids)}")
        _signal_pids(pids, signal.SIGKILL)
        time.sleep(0.2)
        pids = find_tagged(tag, proc_root, sessions)
        seen.update(pids)
    if pids and echo:  # pragma: no cover - a process that survives SIGKILL
        echo(f"processes still there after SIGKILL: {sorted(pids)}")
    return sorted(seen)
