"""`fedsb run CONFIG`: one Flower simulation (`flwr run`), from a validated config to a finished run.

What it does, in order (each step is a Flower command line, not a Python import of flwr):
1. load and validate the config with its overrides, then check every input as the run will use
   it (`fedsb.experiment.plan.check_plan`: the data file and its columns, enough examples per
   client, the model, its target modules and the rank, the output directory, DP's delta); a bad
   input stops here with one line, nothing started (`fedsb run --check` stops here, printing the plan);
2. create the run directory and write the resolved config into it;
3. start a private SuperLink (simulation, process isolation of the app, a free port on
   127.0.0.1, its own FLWR_HOME, runtime dependency installation off) and wait until healthy;
4. `flwr run <app> --federation-config "num-supernodes=N ..." --run-config "config=... run-dir=..."`;
5. stream the run's log (filtered to what a person wants to read; all of it goes to
   <run dir>/flower.log) and wait for the run's final status, which `flwr ls` reports:
   `flwr run --stream` can exit 0 on a failed run, so the status is what counts;
6. stop the run if it is still going, and stop the SuperLink and everything it started.

Step 6 runs however the command ends: the run's end, an error, Ctrl-C or SIGTERM (`fedsb run`
turns both signals into an exception, fedsb.ops.interrupts, so this clean-up runs). "Everything
it started" is the SuperLink's process group and every process carrying this launch's
FEDSB_PROCESS_TAG (the SuperExec, `flwr-simulation` and Ray's processes, which leave the group):
see fedsb.ops.processes. The clean-up itself is `deferred`: a second signal cannot cut it short.

Starting and stopping processes (fedsb.ops.processes) and running `flwr` (fedsb.ops.flwr_cli) are
shared with the local deployment (fedsb.ops.deploy).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from fedsb.experiment.plan import Plan

from fedsb.experiment.checkpoint import has_checkpoint, read_checkpoint
from fedsb.experiment.config import AUTO_CLIENTS, ExperimentConfig, flatten, is_file_source, load_config
from fedsb.experiment.rundir import run_dir_for, write_config
from fedsb.federation.apps import project_dir
from fedsb.ops.flwr_cli import COMPLETED, FINISHED, flower_env, run_flwr, write_connection
from fedsb.ops.interrupts import deferred, signal_name
from fedsb.ops.processes import (
    free_ports,
    never_raising,
    new_tag,
    spawn,
    stop_processes,
    stop_tagged,
    tagged_env,
    wait_until,
)

CONNECTION = "fedsb-local"  # the SuperLink connection name in the private FLWR_HOME
STATUS_POLL_S = 5.0  # a run's status is asked this often while its log streams (and when it ends)
# Lines of the run log that carry no information for a person (the full log is kept).
NOISE = ("FutureWarning", "warnings.warn(", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "Flattening the indices",
         "Loading weights", "LOAD REPORT", "classifier.", "Key  ", "------", "Notes:", "- MISSING",
         "is_gradient_checkpointing")


@dataclass
class RunOutcome:
    run_id: int | None
    status: str
    details: str
    run_dir: Path
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED


@contextlib.contextmanager
def local_superlink(workdir: Path, log_file: Path, timeout_s: float = 90.0,
                    echo: Callable[[str], None] | None = None) -> Iterator[tuple[dict, int]]:
    """A private simulation SuperLink on a free port. On exit (however the block ends) it is stopped
    with its process group, and so is every process carrying its tag (its SuperExec, the
    simulation, Ray's processes: they leave the group)."""
    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1, port_range=None)  # an ephemeral port from the OS
    write_connection(home, CONNECTION, f"127.0.0.1:{port}")
    tag = new_tag()
    env = tagged_env(flower_env(home), tag)
    argv = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(port), "--log-file", str(home / "superlink.log")]
    superlink = None
    try:
        superlink = spawn("superlink", argv, log=log_file, cwd=workdir, env=env)  # stopped with its group
        wait_until(superlink, lambda: _healthy(port), timeout_s, "healthy", "the SuperLink", interval=0.5)
        yield env, port
    finally:
        with deferred():
            # Everything with the tag (the SuperLink too) while the SuperExec still holds its session
            # (see fedsb.ops.processes), then the SuperLink's group, which also reaps the SuperLink.
            stop_tagged(tag, grace_s=10.0, echo=echo)
            if superlink is not None:
                stop_processes([superlink], grace_s=5.0, echo=echo)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every command that launches simulations (`fedsb run`, `fedsb sweep`)."""
    parser.add_argument("--cpus-per-client", type=int, default=1, metavar="N",
                        help="CPU cores per virtual client (Flower's client-resources-num-cpus; also "
                             "torch's thread count in each client) (default: %(default)s)")
    parser.add_argument("--gpus-per-client", type=float, default=0.0, metavar="F",
                        help="GPUs per virtual client (Flower's client-resources-num-gpus): 0.25 lets four "
                             "clients, each with its own copy of the base model, share one GPU "
                             "(default: %(default)s, the CPU)")
    parser.add_argument("--app", type=Path, default=None, metavar="DIR",
                        help="the Flower app directory (default: the fedsb project root)")
    parser.add_argument("--engine", choices=sorted(ENGINES), default=None,
                        help="flower: a Flower simulation through a private SuperLink (the default); "
                             "inprocess: the same ServerApp and ClientApp over an in-process grid, the "
                             "clients in one worker process per core (no SuperLink, no Ray): the same "
                             "numbers, less start-up (a sweep file's `engine:` otherwise)")


class LocalSimulation:
    """A private simulation SuperLink for one run or many (a sweep's cells share one).

    It starts on the first `run` (and again if it has stopped answering); `close()` (or leaving the
    `with` block) stops it and everything it started. Runs are followed from this process through
    the Control API (fedsb.ops.control): no `flwr ls` or `flwr log` process per run or per poll.
    """

    def __init__(self, echo: Callable[[str], None] = print):
        self.echo = never_raising(echo)  # the clean-up must not stop at a message it cannot print
        self.runs = 0
        self._stack: contextlib.ExitStack | None = None
        self._workdir: Path | None = None
        self._env: dict[str, str] = {}
        self._port = 0
        self._control = None

    def __enter__(self) -> LocalSimulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, log_file: Path) -> None:
        from fedsb.ops.control import ControlClient

        self.close()
        stack = contextlib.ExitStack()
        try:
            self._workdir = Path(tempfile.mkdtemp(prefix="fedsb-flower-"))
            stack.callback(shutil.rmtree, self._workdir, ignore_errors=True)
            superlink = local_superlink(self._workdir, log_file, echo=self.echo)
            self._env, self._port = stack.enter_context(superlink)
            self._control = stack.enter_context(ControlClient(f"127.0.0.1:{self._port}"))
        except BaseException:
            with deferred():
                stack.close()
            raise
        self._stack = stack

    def close(self) -> None:
        """Stop the SuperLink and every process it started (a no-op when none runs)."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            with deferred():
                stack.close()

    def run(self, config: ExperimentConfig, run_dir: Path, *, app_dir: Path | None = None,
            cpus_per_client: int = 1, gpus_per_client: float = 0.0, stream: bool = True,
            timeout_s: float = 6 * 3600, resume: bool = False,
            echo: Callable[[str], None] | None = None) -> RunOutcome:
        """Submit the run of run_dir/config.yaml, follow it to its final status, stop it if interrupted.
        `echo`: where this run's lines go (default: the simulation's)."""
        echo = never_raising(echo) if echo is not None else self.echo
        app_dir = (app_dir or project_dir()).resolve()
        log_file = run_dir / "flower.log"
        start = time.monotonic()
        if self._stack is None or not _healthy(self._port):
            self._start(log_file)
        assert self._workdir is not None and self._control is not None
        run_id = None
        status, details = "not started", ""
        try:
            # A simulation: the server assigns the partitions to the nodes (no message per node).
            run_config = f"config='{run_dir / 'config.yaml'}' run-dir='{run_dir}' assign-partitions=true"
            if resume:
                run_config += " resume=true"
            reply = run_flwr(["run", str(app_dir), CONNECTION, "--federation-config",
                              _federation(config, cpus_per_client, gpus_per_client), "--run-config",
                              run_config], env=self._env, cwd=self._workdir)
            if not reply.get("success"):
                raise RuntimeError(f"flwr run refused the run: {reply.get('error-message', reply)}")
            run_id = int(reply["run-id"])
            self.runs += 1
            echo(f"fedsb run: Flower run {run_id} submitted; log: {log_file}")
            with open(log_file, "a") as log:
                follower = self._control.follow_log(run_id, LogWriter(log, echo if stream else None))
                try:
                    status, details = self._wait(run_id, start + timeout_s, follower.ended)
                finally:
                    follower.stop()
                    if not status.startswith(FINISHED):  # interrupted or timed out: stop the run first
                        with deferred(), contextlib.suppress(Exception):
                            run_flwr(["stop", str(run_id), CONNECTION], env=self._env, cwd=self._workdir,
                                     timeout=30)
        except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM
            self.close()  # every process stopped before the message says so
            what = f"Flower run {run_id} and every process" if run_id is not None else "every process"
            echo(f"fedsb run: interrupted ({signal_name(getattr(err, 'signum', signal.SIGINT))}): {what} it "
                 f"started stopped; partial results in {run_dir}")
            raise
        outcome = RunOutcome(run_id, status, details, run_dir, time.monotonic() - start)
        echo(f"fedsb run: Flower run {run_id} {status}{': ' + details if details and not outcome.ok else ''} "
             f"in {outcome.elapsed_s:.0f} s; results in {run_dir}")
        return outcome

    def _wait(self, run_id: int, deadline: float, log_ended: threading.Event) -> tuple[str, str]:
        """The run's final status. The end of its log stream says when to ask (at once); the status
        is also asked every STATUS_POLL_S seconds, in case the stream dropped."""
        assert self._control is not None
        while True:
            try:
                status, details = self._control.run_status(run_id)
            except Exception as err:  # noqa: BLE001 - a SuperLink that does not answer is waited for
                status, details = "unknown", str(err)
            if status.startswith(FINISHED):
                return status, details
            if time.monotonic() > deadline:
                return status, "timed out"
            if log_ended.is_set():
                time.sleep(0.2)  # the stream ended just before the status changed
            else:
                log_ended.wait(STATUS_POLL_S)


class LogWriter:
    """Writes a run's streamed log to its file, and the readable lines to `echo` (None: none)."""

    def __init__(self, log: TextIO, echo: Callable[[str], None] | None):
        self.log, self.echo = log, echo
        self._partial = ""

    def __call__(self, text: str) -> None:
        self.log.write(text)
        self.log.flush()
        if self.echo is None:
            return
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            line = line.rstrip()
            if line.strip() and not any(noise in line for noise in NOISE):
                self.echo(line)


def run_simulation(config_path: str | Path | None, overrides: Mapping[str, Any] | None = None, *,
                   app_dir: Path | None = None, cpus_per_client: int = 1, gpus_per_client: float = 0.0,
                   stream: bool = True, resume: str | Path | None = None,
                   echo: Callable[[str], None] = print, timeout_s: float = 6 * 3600,
                   simulation: LocalSimulation | None = None) -> RunOutcome:
    """Validate, launch `flwr run` on a private SuperLink, wait for the final status, clean up.

    `resume`: a stopped run's directory, continued from its last checkpoint; a config or overrides
    given beside it must resolve to the run's own config (the first key that differs is refused).
    `simulation`: a SuperLink shared with other runs (a sweep's), left running; by default this
    run starts its own and stops it."""
    launch = dict(app_dir=app_dir, cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client,
                  stream=stream, timeout_s=timeout_s)
    if simulation is None:
        with LocalSimulation(echo) as own:
            return run_simulation(config_path, overrides, resume=resume, echo=echo, simulation=own, **launch)
    if resume is not None:
        return _resume(Path(resume), config_path, overrides, simulation, echo, **launch)
    # Every check first (config, resources, data, model, output directory), in a child process that
    # ends before the run starts (this one never imports torch): nothing started yet.
    config = prepare_run_isolated(config_path, overrides, cpus_per_client, gpus_per_client)
    run_dir = run_dir_for(config)
    write_config(run_dir, config.to_dict())
    echo(f"fedsb run: {config.method.name}, rank {config.method.rank}, {config.federation.num_clients} "
         f"clients, {config.federation.rounds} rounds -> {run_dir}")
    return simulation.run(config, run_dir, echo=echo, **launch)


def _resume(run_dir: Path, config_path: str | Path | None, overrides: Mapping[str, Any] | None,
            simulation: LocalSimulation, echo: Callable[[str], None], **launch: Any) -> RunOutcome:
    """`fedsb run --resume RUN_DIR`: the run's own config, checked against any given, from its checkpoint."""
    run_dir = run_dir.expanduser().resolve()
    config, finished = resume_target(run_dir, config_path, overrides, echo)
    if finished is not None:
        return finished
    return simulation.run(config, run_dir, resume=True, echo=echo, **launch)


def resume_target(run_dir: Path, config_path: str | Path | None, overrides: Mapping[str, Any] | None,
                  echo: Callable[[str], None]) -> tuple[ExperimentConfig, RunOutcome | None]:
    """A stopped run's own config, checked against any config and overrides given beside it (the first
    key that differs is refused), and, when the run has finished already, its outcome (nothing to do)."""
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"--resume {run_dir}: not a run directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml")
    if config_path is not None or overrides:
        given = flatten(load_config(config_path or run_dir / "config.yaml", overrides).to_dict())
        saved = flatten(config.to_dict())
        for key, value in saved.items():
            if key != "output_dir" and given.get(key) != value:
                raise ValueError(f"--resume {run_dir}: {key} is {given.get(key)!r} here but "
                                 f"{value!r} in the run; resume with the run's own config")
    if (run_dir / "summary.json").is_file():
        echo(f"fedsb run: {run_dir} has finished (summary.json); nothing to resume")
        return config, RunOutcome(None, COMPLETED, "already finished", run_dir, 0.0)
    if not has_checkpoint(run_dir):
        raise ValueError(f"--resume {run_dir}: no checkpoint (the run stopped before its first round ended); "
                         "start it again")
    echo(f"fedsb run: resuming {run_dir} after round {read_checkpoint(run_dir).round} "
         f"of {config.federation.rounds}")
    return config, None


def prepare_run(config_path: str | Path | None, overrides: Mapping[str, Any] | None = None,
                cpus_per_client: int = 1, gpus_per_client: float = 0.0) -> tuple[ExperimentConfig, Plan]:
    """The resolved config and its checked plan (`fedsb run --check` and the start of every run).

    Raises a ValueError of one line on a bad config, resources this machine lacks, or an input
    the run could not use (`check_plan`); starts nothing and writes nothing.
    """
    from fedsb.experiment.plan import check_plan  # torch, transformers, datasets

    config = load_config(config_path, None if overrides is None else dict(overrides))
    config = config.with_clients(AUTO_CLIENTS)  # 'auto': as many as the SuperNodes fedsb run starts
    check_resources(cpus_per_client, gpus_per_client)
    # The apps run in another working directory: make local data paths absolute.
    if is_file_source(config.data.source):
        config.data.source = str(Path(config.data.source).expanduser().resolve())
    for key in ("test_file", "val_file"):
        value = getattr(config.data, key)
        if value and is_file_source(value):
            setattr(config.data, key, str(Path(value).expanduser().resolve()))
    return config, check_plan(config)


def prepare_run_isolated(config_path: str | Path | None, overrides: Mapping[str, Any] | None = None,
                         cpus_per_client: int = 1, gpus_per_client: float = 0.0) -> ExperimentConfig:
    """`prepare_run`'s config, checked in a child process that exits when it is done: the launcher
    itself never imports torch, transformers or datasets, so it holds tens of MB while the run goes
    on, not 450 MB. Its errors are raised here as they would be in this process."""
    import multiprocessing
    import sys
    from concurrent.futures import ProcessPoolExecutor

    if "fedsb.experiment.plan" in sys.modules:  # the checks' stack is loaded already (a test, a
        return _checked_config(config_path, overrides, cpus_per_client, gpus_per_client)  # notebook)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(_checked_config, config_path, None if overrides is None else dict(overrides),
                            cpus_per_client, gpus_per_client).result()


def _checked_config(*args: Any) -> ExperimentConfig:
    return prepare_run(*args)[0]  # the plan's objects would bring torch back with them


def check_resources(cpus_per_client: int, gpus_per_client: float) -> None:
    """One clear line, before anything starts, for resources this machine cannot give a client."""
    if cpus_per_client < 1:
        raise ValueError(f"--cpus-per-client {cpus_per_client}: expected an integer >= 1")
    if gpus_per_client < 0:
        raise ValueError(f"--gpus-per-client {gpus_per_client:g}: expected a number >= 0")
    if gpus_per_client > 0:
        import torch

        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise ValueError(f"--gpus-per-client {gpus_per_client:g}: this machine has no CUDA device")
        if gpus_per_client > available:
            raise ValueError(f"--gpus-per-client {gpus_per_client:g}: this machine has {available} GPU(s)")


def _federation(config: ExperimentConfig, cpus_per_client: int, gpus_per_client: float = 0.0) -> str:
    """Flower's federation config: one SuperNode per client, each with these resources. Ray starts as
    many client actors at once as the resources allow (e.g. 4 per GPU with 0.25 GPUs per client)."""
    federation = (f"num-supernodes={config.federation.num_clients} "
                  f"client-resources-num-cpus={cpus_per_client}")
    if gpus_per_client > 0:
        federation += f" client-resources-num-gpus={gpus_per_client:g}"
    return federation


def run_in_process_engine(config_path: str | Path | None, overrides: Mapping[str, Any] | None = None, *,
                          app_dir: Path | None = None, cpus_per_client: int = 1,
                          gpus_per_client: float = 0.0, stream: bool = True,
                          resume: str | Path | None = None, echo: Callable[[str], None] = print,
                          timeout_s: float = 6 * 3600, simulation: LocalSimulation | None = None,
                          client_processes: int | None = None) -> RunOutcome:
    """`fedsb run --engine inprocess`: the run of `run_simulation`, with the same checks, run directory,
    ServerApp and ClientApp, over fedsb.federation.inprocess's grid instead of a SuperLink: the
    clients run in `client_processes` worker processes (default: one per `cpus_per_client` cores, or
    per `gpus_per_client` share of a GPU), each with `cpus_per_client` torch threads, as Flower's Ray
    actors have. Flower's runtime (SuperLink, SuperExec, Ray) is not started, which saves its start-up
    and memory; `tests/test_engines.py` holds the two engines equal, metrics, bytes and adapter.

    The server's log goes to <run dir>/run.log (and to `echo` with `stream`). A run that raises is
    returned as `finished:failed` with its reason, as Flower reports a failed run. The apps come from
    `app_dir` (default: the project root); `timeout_s` and `simulation` are accepted for the runner's
    signature and not used."""
    import os

    from fedsb.federation.inprocess import run_in_process

    del timeout_s, simulation
    start = time.monotonic()
    if resume is not None:
        run_dir = Path(resume).expanduser().resolve()
        config, finished = resume_target(run_dir, config_path, overrides, echo)
        if finished is not None:
            return finished
    else:
        config = prepare_run_isolated(config_path, overrides, cpus_per_client, gpus_per_client)
        run_dir = run_dir_for(config)
        write_config(run_dir, config.to_dict())
    if client_processes is None:
        share = int(1 / gpus_per_client) if gpus_per_client > 0 else (os.cpu_count() or 1) // cpus_per_client
        client_processes = max(1, min(share, config.federation.num_clients))
    echo(f"fedsb run: {config.method.name}, rank {config.method.rank}, {config.federation.num_clients} "
         f"clients, {config.federation.rounds} rounds, in-process engine ({client_processes} client "
         f"process(es)) -> {run_dir}")
    run_config = {"config": str(run_dir / "config.yaml"), "run-dir": str(run_dir),
                  "assign-partitions": True, "resume": resume is not None}
    handler = _RunLogHandler(run_dir / "run.log", echo if stream else None)
    flower_logger = logging.getLogger("flwr")
    console_levels = {h: h.level for h in flower_logger.handlers}
    for console in console_levels:  # the lines go to `echo` (plain) instead of Flower's coloured console
        console.setLevel(logging.WARNING)
    flower_logger.addHandler(handler)
    status, details = f"{FINISHED}:failed", ""
    try:
        run_in_process(run_config, config.federation.num_clients, client_threads=cpus_per_client,
                       client_processes=client_processes, app_dir=app_dir)
        status = COMPLETED
    except Exception as err:  # noqa: BLE001 - a failed run is an outcome, as Flower reports one
        details = f"{type(err).__name__}: {err}"
        handler.emit(logging.makeLogRecord({"msg": f"run failed: {details}", "levelno": logging.ERROR}))
    finally:
        flower_logger.removeHandler(handler)
        handler.close()
        for console, level in console_levels.items():
            console.setLevel(level)
    outcome = RunOutcome(None, status, details, run_dir, time.monotonic() - start)
    echo(f"fedsb run: {status}{': ' + details if details else ''} in {outcome.elapsed_s:.0f} s; "
         f"results in {run_dir}")
    return outcome


class _RunLogHandler(logging.Handler):
    """The server's log lines (Flower's logger) to a file, and to `echo` when given."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None):
        super().__init__()
        self.file = open(path, "a")  # noqa: SIM115 - closed by close()
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.file.write(line + "\n")
        self.file.flush()
        if self.echo is not None:
            self.echo(line)

    def close(self) -> None:
        self.file.close()
        super().close()


# `fedsb run --engine` and a sweep's `engine:` choose one of these runners (one signature).
ENGINES: dict[str, Callable[..., RunOutcome]] = {"flower": run_simulation, "inprocess": run_in_process_engine}
DEFAULT_ENGINE = "flower"
