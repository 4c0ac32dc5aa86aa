"""The fedsb Flower app on Flower's deployment engine, as processes on this machine.

The topology is the one `docker-compose.yml` ships, without Docker: one SuperLink, one SuperExec
that runs the ServerApp, and N SuperNodes, each with its own SuperExec for the ClientApps
(`--isolation process` everywhere). By default the SuperLink serves TLS with a certificate made
for this run (fedsb.ops.deploy.credentials), and only SuperNodes whose public keys were
registered with `flwr supernode register` may join (`--enable-supernode-auth`). Everything
listens on 127.0.0.1, on free ports in 41000-41999, and every process gets a private FLWR_HOME
under the work directory.

`deploy_local()` starts it all, submits one `flwr run`, waits for the run's final status (never
trusting an exit code: the status comes from `flwr ls --run-id`), saves the run's log, and stops
every process it started, also on errors, Ctrl-C and SIGTERM (`fedsb deploy-local` turns both
signals into an exception, fedsb.ops.interrupts): by process group, SIGTERM then SIGKILL, and then
every process carrying the deployment's FEDSB_PROCESS_TAG that left its group (fedsb.ops.processes
says how they are found).
`LocalDeployment` is the same machinery one step at a time (tests use it to add SuperNodes
that must be refused).

flwr 1.41 facts this relies on (from its `--help` and source):
- The SuperLink serves the Fleet, Control and Runtime APIs over HTTP(S) on ONE port (`--host`,
  `--port`); SuperNodes, SuperExecs and the `flwr` CLI all connect to that port.
- `--enable-supernode-auth` refuses self-registration; a SuperNode's public key must be
  registered first with `flwr supernode register KEY.pub CONNECTION`. The SuperNode signs its
  requests with `--auth-supernode-private-key` (an OpenSSH EC key on a NIST curve); the old
  `--auth-list-public-keys` and `--auth-supernode-public-key` flags are deprecated or refused.

This module never imports flwr; it drives the installed commands through subprocesses
(fedsb.ops.processes, fedsb.ops.flwr_cli). It is one file over 400 lines because
LocalDeployment is one lifecycle (start, add nodes, run, stop) whose steps share its state.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedsb.ops.deploy.credentials import Credentials, generate_credentials, generate_node_key
from fedsb.ops.flwr_cli import COMPLETED, FlwrError, flower_env, run_flwr, write_connection, write_run_config
from fedsb.ops.interrupts import deferred
from fedsb.ops.processes import (
    PORT_RANGE,
    Echo,
    ManagedProcess,
    ProcessError,
    free_ports,
    never_raising,
    new_tag,
    spawn,
    stop_processes,
    stop_tagged,
    tagged_env,
    tail,
    wait_for_port,
)

CONNECTION = "fedsb-deploy"  # the SuperLink connection name in the deployment's FLWR_HOME
FINAL_OK = COMPLETED


class DeployError(ProcessError):
    """A deployment step failed; the message names the step and points at its log. (Failures of
    the processes and of `flwr` themselves are ProcessError and FlwrError, its siblings.)"""


def _say(msg: str) -> None:
    print(f"[deploy] {msg}", flush=True)


@dataclass
class SuperNodeHandle:
    name: str
    partition_id: int
    supernode: ManagedProcess
    superexec: ManagedProcess | None
    node_id: int | None  # known up front when the key was registered
    runtime_port: int
    authorised: bool = True  # False for nodes started to be refused


class LocalDeployment:
    """A SuperLink, its ServerApp SuperExec and SuperNodes (with their SuperExecs) on 127.0.0.1.

    Use it as a context manager: leaving the block stops every process it started.
    """

    def __init__(self, workdir: str | os.PathLike, *, tls: bool = True, auth: bool = True,
                 echo: Echo | None = _say, extra_env: Mapping[str, str] | None = None,
                 port_range: tuple[int, int] = PORT_RANGE, credentials: Credentials | None = None) -> None:
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (flwr refuses --enable-supernode-auth "
                             "with --insecure)")
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.home = self.workdir / "home"  # FLWR_HOME of the SuperLink and of the flwr CLI
        self.home.mkdir(exist_ok=True)
        self.tls, self.auth = tls, auth
        self.echo: Echo = never_raising(echo)  # stop() must not fail on a closed stdout
        self.tag = new_tag()  # in every process's environment: finds those that leave their group
        self.extra_env = dict(extra_env or {})
        self.port_range = port_range
        self.procs: list[ManagedProcess] = []
        self.nodes: list[SuperNodeHandle] = []
        self._streams: dict[int, ManagedProcess] = {}  # run id -> its `flwr log --stream` process
        self.superlink_port: int | None = None
        self.creds: Credentials | None = credentials  # None: made for this deployment
        self._used_ports: set[int] = set()
        self._stopped = self._closing = False
        atexit.register(self.stop)

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def superlink_address(self) -> str:
        if self.superlink_port is None:
            raise DeployError("the SuperLink is not started")
        return f"127.0.0.1:{self.superlink_port}"

    def env(self, flwr_home: Path | None = None) -> dict[str, str]:
        return tagged_env(flower_env(flwr_home or self.home, self.extra_env), self.tag)

    def _ports(self, n: int) -> list[int]:
        ports = free_ports(n, self.port_range, exclude=self._used_ports)
        self._used_ports.update(ports)
        return ports

    def spawn(self, name: str, argv: list[str], flwr_home: Path | None = None) -> ManagedProcess:
        """Start `argv` in its own session (process group), output to logs/<name>.log, from the
        work directory (a neutral cwd: the app's code must come from the FAB, not from a cwd)."""
        if self._closing:
            raise DeployError("this deployment has been stopped")
        mp = spawn(name, argv, log=self.logs / f"{name}.log", cwd=self.workdir, env=self.env(flwr_home))
        self.procs.append(mp)
        self.echo(f"started {name} (pid {mp.pid}): {' '.join(argv)}")
        return mp

    def flwr(self, *args: str, timeout: float = 120, check: bool = True) -> dict:
        """Run `flwr ARGS --format json` against this SuperLink and return the parsed JSON
        (FlwrError on no reply, and with `check` on a reply that is not a success)."""
        return run_flwr(args, env=self.env(), cwd=self.workdir, timeout=timeout, check=check)

    # -- the SuperLink ------------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60, attempts: int = 3) -> ManagedProcess:
        if self.tls and self.creds is None:
            self.creds = generate_credentials(self.workdir / "certs", hosts=("localhost", "127.0.0.1"))
        for attempt in range(1, attempts + 1):
            (port,) = self._ports(1)
            argv = ["flower-superlink", "--isolation", "process", "--host", "127.0.0.1", "--port", str(port),
                    "--disable-runtime-dependency-installation"]
            if self.tls:
                assert self.creds is not None
                argv += ["--ssl-ca-certfile", str(self.creds.ca_cert),
                         "--ssl-certfile", str(self.creds.server_cert),
                         "--ssl-keyfile", str(self.creds.server_key)]
            else:
                argv += ["--insecure"]
            if self.auth:
                argv += ["--enable-supernode-auth"]
            mp = self.spawn("superlink", argv)
            try:
                wait_for_port(mp, port, timeout, "the SuperLink")
                break
            except ProcessError:
                # the port was free when chosen; someone may have taken it since: try another one
                if mp.alive() or attempt == attempts:
                    raise
                self.echo(f"the SuperLink exited at start (port {port} taken?); retrying")
        self.superlink_port = port
        self._write_cli_config()
        self.echo(f"SuperLink listening on https://{self.superlink_address}" if self.tls else
                  f"SuperLink listening on http://{self.superlink_address} (no TLS)")
        return mp

    def _write_cli_config(self) -> None:
        ca_cert = self.creds.ca_cert if self.tls and self.creds is not None else None
        write_connection(self.home, CONNECTION, self.superlink_address, root_certificates=ca_cert)

    def _tls_client_flags(self) -> list[str]:
        if self.tls:
            assert self.creds is not None
            return ["--root-certificates", str(self.creds.ca_cert)]
        return ["--insecure"]

    def start_serverapp_superexec(self) -> ManagedProcess:
        """The SuperExec that runs the ServerApp (it pulls the run from the SuperLink's Runtime API)."""
        argv = ["flower-superexec", "--runtime-api-address", self.superlink_address,
                *self._tls_client_flags()]
        return self.spawn("superexec-serverapp", argv, flwr_home=self.workdir / "serverapp-home")

    # -- SuperNodes -----------------------------------------------------------------------------
    def register(self, public_key: Path) -> int | None:
        """Register a SuperNode public key; its node id, or None if it was already registered."""
        data = self.flwr("supernode", "register", str(public_key), CONNECTION, check=False)
        if data.get("success"):
            return int(data["node-id"])
        if "already in use" in str(data.get("error-message", "")):
            return None
        raise DeployError(f"registering {public_key} failed: {data.get('error-message')}")

    def add_supernode(self, partition_id: int, num_partitions: int, *, name: str | None = None,
                      register: bool = True, tls: bool | None = None, with_key: bool | None = None,
                      key: tuple[Path, Path] | None = None, superexec: bool = True,
                      max_retries: int | None = None, max_wait_time: float | None = None) -> SuperNodeHandle:
        """Start a SuperNode with `--node-config "partition-id=I num-partitions=N"` and its SuperExec.

        The defaults make an authorised node of this deployment. For negative tests:
        `register=False` gives it a key the SuperLink does not know; `tls=False` makes it connect
        without TLS (`--insecure`, and then no key, which flwr refuses to combine). Pass
        `max_retries`/`max_wait_time` so a refused node gives up quickly, and `superexec=False`
        (no SuperExec; nothing waits for the node to listen). `key` is an existing
        (private, public) key pair; by default one is made under <workdir>/keys.
        """
        name = name or f"supernode-{partition_id + 1}"
        tls = self.tls if tls is None else tls
        with_key = (self.auth and tls) if with_key is None else with_key
        home = self.workdir / name
        home.mkdir(exist_ok=True)
        (runtime_port,) = self._ports(1)
        argv = ["flower-supernode", "--superlink", self.superlink_address,
                "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port),
                "--node-config", f"partition-id={partition_id} num-partitions={num_partitions}"]
        if tls:
            if self.creds is None:
                raise DeployError("a TLS SuperNode needs a TLS SuperLink")
            argv += ["--root-certificates", str(self.creds.ca_cert)]
        else:
            argv += ["--insecure"]
        node_id = None
        if with_key:
            private, public = key or generate_node_key(self.workdir / "keys", name)
            argv += ["--auth-supernode-private-key", str(private)]
            if register:
                node_id = self.register(public)
                self.echo(f"registered {public.name} with the SuperLink: node id {node_id}")
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        if max_wait_time is not None:
            argv += ["--max-wait-time", str(max_wait_time)]
        node = self.spawn(name, argv, flwr_home=home)
        executor = None
        if superexec:
            wait_for_port(node, runtime_port, 60)
            executor = self.spawn(f"superexec-{name}", [
                "flower-superexec", "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure",
            ], flwr_home=home)
        handle = SuperNodeHandle(name, partition_id, node, executor, node_id, runtime_port,
                                 authorised=tls == self.tls and (register or not with_key))
        self.nodes.append(handle)
        return handle

    def online_nodes(self) -> set[int]:
        data = self.flwr("supernode", "ls", CONNECTION)
        return {int(n["node-id"]) for n in data.get("nodes", []) if n.get("status") == "online"}

    def wait_nodes_online(self, handles: Sequence[SuperNodeHandle], timeout: float = 90) -> set[int]:
        """Wait until every handle's SuperNode is online (by node id when known, else by count)."""
        deadline = time.monotonic() + timeout
        while True:
            for h in handles:
                if not h.supernode.alive():
                    raise DeployError(f"{h.name} exited with code {h.supernode.proc.returncode}; "
                                      f"see {h.supernode.log}:\n{tail(h.supernode.log)}")
            online = self.online_nodes()
            known = {h.node_id for h in handles if h.node_id is not None}
            unknown = sum(1 for h in handles if h.node_id is None)
            if known <= online and len(online - known) >= unknown:
                return online
            if time.monotonic() > deadline:
                raise DeployError(f"only {len(online)} of {len(handles)} SuperNodes came online within "
                                  f"{timeout:.0f} s; logs in {self.logs}")
            time.sleep(1.0)

    # -- runs -------------------------------------------------------------------------------------
    def submit(self, app_dir: str | os.PathLike, run_config: Mapping[str, object] | None = None) -> int:
        argv = ["run", str(Path(app_dir).resolve()), CONNECTION]
        if run_config:
            path = write_run_config(self.workdir / f"run-config-{int(time.time() * 1000)}.toml", run_config)
            argv += ["--run-config", str(path)]
        data = self.flwr(*argv, timeout=300)
        return int(data["run-id"])

    def run_info(self, run_id: int) -> dict:
        data = self.flwr("ls", CONNECTION, "--run-id", str(run_id))
        runs = data.get("runs") or []
        if not runs:
            raise DeployError(f"the SuperLink does not know run {run_id}")
        return runs[0]

    def wait_run(self, run_id: int, timeout: float, poll: float = 3.0,
                 on_change: Callable[[dict], None] | None = None) -> dict:
        """Wait until the run's status (from `flwr ls --run-id`) starts with 'finished', or
        `timeout` passes (then the run is stopped and its info returned with status 'timeout').

        Each `flwr ls` costs about a second of CPU, which a 2-core machine would take from the run:
        while a `stream_log` process follows the run (it ends when the run does), the status is
        read only every 30 s and when that process ends; otherwise every `poll` seconds.
        """
        deadline = time.monotonic() + timeout
        stream = self._streams.get(run_id)
        last = None
        reported: set[str] = set()
        next_check = 0.0
        stream_end_seen = False
        while True:
            now = time.monotonic()
            stream_alive = stream is not None and stream.alive()
            if stream is not None and not stream_alive and not stream_end_seen:
                stream_end_seen = True
                next_check = now  # the log stream ended: the run has most likely finished
            if now >= next_check:
                info = self.run_info(run_id)
                status = str(info.get("status", ""))
                if status != last:
                    last = status
                    if on_change:
                        on_change(info)
                if status.startswith("finished"):
                    return info
                next_check = now + (30.0 if stream_alive and status == "running" else poll)
            for h in self.nodes:  # an authorised SuperNode dying mid-run is worth saying at once
                if h.authorised and not h.supernode.alive() and h.name not in reported:
                    self.echo(f"warning: {h.name} exited with code {h.supernode.proc.returncode}")
                    reported.add(h.name)
            if now > deadline:
                self.echo(f"run {run_id} still '{last}' after {timeout:.0f} s: stopping it")
                with contextlib.suppress(FlwrError):  # the run is given up either way
                    self.flwr("stop", str(run_id), CONNECTION, check=False)
                return dict(info, status="timeout")
            time.sleep(0.5)

    def stream_log(self, run_id: int, echo: Echo | None = None) -> threading.Thread:
        """Follow `flwr log RUN --stream` in the background: each line goes to logs/run-<id>.stream.log
        and, when `echo` is given, to `echo` too. The streaming process is stopped with the rest."""
        mp = self.spawn(f"run-{run_id}.stream", ["flwr", "log", str(run_id), CONNECTION, "--stream"])
        self._streams[run_id] = mp

        def follow() -> None:
            pos = 0
            while True:
                alive = mp.alive()
                try:
                    with open(mp.log, errors="replace") as f:
                        f.seek(pos)
                        chunk = f.read()
                        pos = f.tell()
                except OSError:
                    chunk = ""
                if echo:
                    for line in chunk.splitlines():
                        if line.strip():
                            echo(line)
                if not alive:
                    return
                time.sleep(0.5)

        t = threading.Thread(target=follow, name=f"flwr-log-{run_id}", daemon=True)
        t.start()
        return t

    def save_log(self, run_id: int) -> Path:
        """`flwr log RUN --show` into logs/run-<id>.log (the complete ServerApp log)."""
        path = self.logs / f"run-{run_id}.log"
        cp = subprocess.run(["flwr", "log", str(run_id), CONNECTION, "--show"], capture_output=True,
                            text=True, cwd=self.workdir, env=self.env(), timeout=120,
                            stdin=subprocess.DEVNULL)
        path.write_text(cp.stdout + (cp.stderr if cp.returncode else ""))
        return path

    # -- teardown ---------------------------------------------------------------------------------
    def stop(self, grace: float = 8.0) -> None:
        """Stop every process this deployment started (idempotent; if it is interrupted, the
        `atexit` hook runs it again, and it is safe to repeat)."""
        if self._stopped:
            return
        self._closing = True  # no new processes from here on
        with deferred():  # a signal now is raised once everything is stopped
            alive = [mp for mp in self.procs if mp.alive()]
            if self.procs:
                self.echo(f"stopping {len(alive)} running process(es) of {len(self.procs)} started")
            stop_processes(self.procs, grace_s=grace, echo=self.echo)
            stop_tagged(self.tag, grace_s=grace / 2, echo=self.echo)  # any that left its process group
            self._stopped = True
            atexit.unregister(self.stop)


# ---------------------------------------------------------------------------------------------
# One-call deployment
# ---------------------------------------------------------------------------------------------

@dataclass
class DeployResult:
    run_id: int | None
    status: str
    status_details: str
    run_dir: Path | None
    workdir: Path
    log_path: Path | None
    elapsed_s: float
    node_ids: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == FINAL_OK


def deploy_local(app_dir: str | os.PathLike, *, nodes: int = 2,
                 run_config: Mapping[str, object] | None = None,
                 workdir: str | os.PathLike | None = None, tls: bool = True, auth: bool = True,
                 timeout: float = 1800, stream: bool = True, echo: Echo | None = _say,
                 node_timeout: float = 90) -> DeployResult:
    """Start SuperLink + `nodes` SuperNodes on 127.0.0.1, run the app once, stop everything.

    `run_config` overrides the app's `[tool.flwr.app.config]`. Unless it names `run-dir`, the run
    directory is fixed here (and so known to the caller): `<output-dir>/deploy-<time>` when it
    names `output-dir`, else `<workdir>/run`. The result's status is the run's final status from
    the SuperLink (`finished:completed` is success), or 'timeout'.
    """
    t0 = time.monotonic()
    say = echo or (lambda _m: None)
    if nodes < 1:
        raise ValueError("nodes must be >= 1")
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    rc = dict(run_config or {})
    if not rc.get("run-dir"):
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        if rc.get("output-dir"):
            rc["run-dir"] = str(Path(str(rc["output-dir"])).resolve() / f"deploy-{stamp}")
        else:
            rc["run-dir"] = str(work / "run")
    run_dir = Path(str(rc["run-dir"]))
    say(f"work directory {work} (logs in {work / 'logs'}); run directory {run_dir}")
    say(f"topology: 1 SuperLink + {nodes} SuperNode(s), process isolation, "
        f"TLS {'on' if tls else 'off'}, SuperNode authentication {'on' if auth else 'off'}")

    run_id = None
    log_path = None
    with LocalDeployment(work, tls=tls, auth=auth, echo=echo) as dep:
        dep.start_superlink()
        dep.start_serverapp_superexec()
        handles = [dep.add_supernode(i, nodes) for i in range(nodes)]
        online = dep.wait_nodes_online(handles, timeout=node_timeout)
        say(f"{len(online)} SuperNode(s) online: {sorted(online)}")
        run_id = dep.submit(app_dir, rc)
        say(f"submitted run {run_id} of {Path(app_dir).resolve()}")
        # the stream also lets wait_run poll the status rarely (it ends when the run ends)
        show = (lambda line: print(f"  | {line}", flush=True)) if stream and echo else None
        dep.stream_log(run_id, echo=show)
        info = dep.wait_run(run_id, timeout=timeout,
                            on_change=lambda i: say(f"run {run_id}: {i.get('status')}"))
        log_path = dep.save_log(run_id)
        status = str(info.get("status", "unknown"))
        details = str(info.get("status-details", ""))
        say(f"run {run_id} final status {status}" + (f" ({details})" if details not in ("", "N/A") else "")
            + f"; log saved to {log_path}")
    elapsed = time.monotonic() - t0
    return DeployResult(run_id, status, details, run_dir, work, log_path, elapsed, sorted(online))
