"""docker-compose.yml, for real: the images built, the deployment up, two runs over TLS, down.

One scenario (the module fixture) drives the real thing, and the tests below assert on what it saw:

1. credentials from scripts/gen-certs.sh (what users run), owned by uid 49999 as the docs say;
2. the images from scripts/build-local-images.sh (official Flower images where Docker Hub answers,
   stand-ins where it does not; the app image from ./Dockerfile);
3. `docker-compose up -d` of docker-compose.yml, unchanged, plus a generated override that puts
   every container on the host network with its own ports on 127.0.0.1 (nothing talks over Docker's
   bridge network) and turns Flower's update check off;
4. a SuperNode container with a key the SuperLink does not know, which must be refused;
5. run 1 (`flwr run` over TLS to the SuperLink's port, 1 round of Fed-SB on the tiny config): it
   completes, and its run directory in the `runs` volume has both partitions in comm.csv and the
   exported adapter;
6. run 2 (2 rounds, federation.round_timeout_s short): the supernode-2 container is killed once
   round 1 is in; what happens is asserted (the run completes over supernode-1, round 2 records
   partition 1 as failed);
7. `docker-compose down -v`, in a `finally`: no container, network or volume of the project is left.

Docker not installed (or no Compose): skipped, with the reason. Docker installed but its daemon
not reachable: a failure (.ci/run starts dockerd). Timings are printed (`pytest -s`) and written to
<workdir>/timings.json; the workdir (certificates, override, logs, copied run directories) is kept
when something failed.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import skip_or_fail

from fedsb.ops.flwr_cli import COMPLETED, FLOWER_ENV, run_flwr, write_connection, write_run_config
from fedsb.ops.processes import free_ports

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
BUILD_IMAGES = ROOT / "scripts" / "build-local-images.sh"
GEN_CERTS = ROOT / "scripts" / "gen-certs.sh"
FLWR_VERSION = "1.41.0"
TINY = "tests/configs/tiny.yaml"  # resolved inside the FAB
CONNECTION = "fedsb-compose"
APP_UID = 49999  # the official Flower images run as `app`, uid 49999
ROUND_TIMEOUT_S = 60  # run 2: long enough for a live client's round, short enough for CI
SUPERNODES = 2


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=60).returncode == 0:
        return ["docker", "compose"]
    return None


def _docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    cp = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise AssertionError(f"`docker {' '.join(args)}` failed ({cp.returncode}): {cp.stderr.strip()}")
    return cp


# ---------------------------------------------------------------------------------------------
# The host-network override
# ---------------------------------------------------------------------------------------------

def host_network_override(compose: dict, superlink_port: int, runtime_ports: dict[str, int]) -> dict:
    """An override for `compose` (docker-compose.yml, loaded) that puts every service on the host
    network with its own ports on 127.0.0.1.

    Each command is the compose file's own, with only addresses changed: `superlink:8000` and
    `supernode-<i>:9094` become 127.0.0.1 and the chosen port, and each server's `--host 0.0.0.0
    --port N` becomes `--host 127.0.0.1 --port <chosen>` (on the host network 0.0.0.0 would
    listen on every interface, and two SuperNodes cannot both take 9094).
    """
    services = compose["services"]
    addresses = {"superlink:8000": f"127.0.0.1:{superlink_port}"}
    addresses.update({f"{name}:9094": f"127.0.0.1:{port}" for name, port in runtime_ports.items()})
    listen = {"superlink": superlink_port, **runtime_ports}
    out: dict[str, dict] = {}
    for name, svc in services.items():
        command = [str(a) for a in svc.get("command", [])]
        rewritten = []
        for i, arg in enumerate(command):
            for old, new in addresses.items():
                arg = arg.replace(old, new)
            if i > 0 and command[i - 1] == "--host" and name in listen:
                arg = "127.0.0.1"
            if i > 0 and command[i - 1] == "--port" and name in listen:
                arg = str(listen[name])
            rewritten.append(arg)
        entry: dict = {"network_mode": "host",
                       "environment": {"FLWR_DISABLE_UPDATE_CHECK": "1"}}  # no call home
        if rewritten:
            entry["command"] = rewritten
        out[name] = entry
    for name in listen:
        cmd = out[name]["command"]
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1", f"{name} would not listen on 127.0.0.1 only"
    leftover = [a for entry in out.values() for a in entry.get("command", [])
                if re.search(r"superlink:\d|supernode-\d+:\d|0\.0\.0\.0", a)]
    assert not leftover, f"addresses the override does not rewrite: {leftover}"
    return {"services": out}



def without_port_publish(text: str) -> str:
    """docker-compose.yml's text without the superlink's `ports:` entry, and nothing else changed.

    On the host network nothing is published (the SuperLink listens on the host's 127.0.0.1
    itself), and Compose v1 refuses a service with both ("host" network_mode is incompatible with
    port_bindings); an override cannot remove a list entry, so the test runs this copy.
    """
    lines = text.splitlines(keepends=True)
    start = lines.index("    ports:\n")
    end = start + 1
    while lines[end].startswith("      - "):
        end += 1
    assert end - start == 2, "the superlink publishes more than one port: update the test"
    return "".join(lines[:start] + lines[end:])

def test_override_rewrites_only_addresses():
    """The override (fast check, no Docker): same commands, addresses on 127.0.0.1, distinct ports."""
    compose = yaml.safe_load(COMPOSE.read_text())
    override = host_network_override(compose, 42000, {"supernode-1": 42001, "supernode-2": 42002})
    services = override["services"]
    assert set(services) == set(compose["services"])
    assert all(s["network_mode"] == "host" for s in services.values())
    link = services["superlink"]["command"]
    assert link[link.index("--port") + 1] == "42000" and "--enable-supernode-auth" in link
    node = services["supernode-2"]["command"]
    assert node[node.index("--superlink") + 1] == "${SUPERLINK_ADDRESS:-127.0.0.1:42000}"
    assert node[node.index("--port") + 1] == "42002"
    assert "127.0.0.1:42002" in services["superexec-clientapp-2"]["command"]
    assert 'address = "127.0.0.1:42000"' in services["supernode-register"]["command"][0]
    for name, svc in compose["services"].items():  # nothing else changed
        base = [str(a) for a in svc.get("command", [])]
        new = services[name].get("command", [])
        assert len(base) == len(new)
        changed = [a for a, b in zip(base, new, strict=True) if a != b]
        assert [a for a in changed if not re.search(r"\d{4}|0\.0\.0\.0", a)] == []



def test_the_compose_file_the_test_runs_differs_only_by_the_port_publish():
    import difflib

    base = COMPOSE.read_text()
    diff = [line for line in difflib.unified_diff(base.splitlines(), without_port_publish(base).splitlines(),
                                                  lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("---", "+++"))]
    assert len(diff) == 2 and diff[0] == "-    ports:"
    assert diff[1].startswith('-      - "${SUPERLINK_PORT:-8000}:8000"')
    assert "ports" not in yaml.safe_load(without_port_publish(base))["services"]["superlink"]

# ---------------------------------------------------------------------------------------------
# The scenario
# ---------------------------------------------------------------------------------------------

@dataclass
class ComposeOutcome:
    workdir: Path
    project: str
    timings: dict[str, float] = field(default_factory=dict)
    images: dict[str, dict] = field(default_factory=dict)        # image -> docker image inspect
    build_log: str = ""
    online: list[dict] = field(default_factory=list)             # `flwr supernode ls` after up
    refused: tuple[int | None, str] = (None, "")                 # the unregistered SuperNode: code, log
    run1: dict = field(default_factory=dict)                     # `flwr ls --run-id` of run 1
    run1_dir: Path | None = None
    run2: dict = field(default_factory=dict)
    run2_dir: Path | None = None
    killed: dict = field(default_factory=dict)                   # the killed container's state
    leftovers: dict[str, list[str]] = field(default_factory=dict)


class Compose:
    """`docker-compose -p PROJECT -f COMPOSE_FILE -f OVERRIDE --project-directory WORKDIR`: the
    compose file's relative paths (./certs) resolve inside the test's workdir."""

    def __init__(self, base: list[str], project: str, workdir: Path, files: list[Path], env: dict[str, str]):
        self.argv = [*base, "-p", project, *(a for f in files for a in ("-f", str(f))),
                     "--project-directory", str(workdir)]
        self.env = env
        self.workdir = workdir

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cp = subprocess.run([*self.argv, *args], capture_output=True, text=True, timeout=timeout,
                            env=self.env, cwd=self.workdir)
        if check and cp.returncode != 0:
            raise AssertionError(f"`docker-compose {' '.join(args)}` failed ({cp.returncode}):\n"
                                 f"{cp.stdout[-3000:]}{cp.stderr[-3000:]}")
        return cp

    def container(self, service: str) -> str:
        cid = self("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid.splitlines()[0]


def _say(message: str) -> None:
    print(f"[compose] {message}", flush=True)


def _wait_online(home: Path, n: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    nodes: list[dict] = []
    while time.monotonic() < deadline:
        data = run_flwr(["supernode", "ls", CONNECTION], env=_flwr_env(home), cwd=home)
        nodes = data.get("nodes", [])
        if sum(1 for node in nodes if node.get("status") == "online") >= n:
            return nodes
        time.sleep(3)
    raise AssertionError(f"{n} SuperNodes not online after {timeout:.0f} s: {nodes}")


def _flwr_env(home: Path) -> dict[str, str]:
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home)}


def _submit(home: Path, workdir: Path, name: str, run_config: dict) -> int:
    rc = write_run_config(workdir / f"{name}.toml", run_config)
    data = run_flwr(["run", str(ROOT), CONNECTION, "--run-config", str(rc)], env=_flwr_env(home), cwd=home,
                    timeout=300, check=True)
    return int(data["run-id"])


def _run_info(home: Path, run_id: int) -> dict:
    data = run_flwr(["ls", CONNECTION, "--run-id", str(run_id)], env=_flwr_env(home), cwd=home, check=True)
    return data["runs"][0]


def _wait_run(home: Path, run_id: int, timeout: float, during=None) -> dict:
    """Poll `flwr ls --run-id` (every 10 s: each call costs a CPU-second the run could use) until
    the status starts with 'finished'; `during()` is called between polls."""
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        info = _run_info(home, run_id)
        if str(info.get("status", "")).startswith("finished"):
            return info
        for _ in range(10):
            if during:
                during()
            time.sleep(1)
    raise AssertionError(f"run {run_id} not finished after {timeout:.0f} s: {info}")


def _read_in_container(cid: str, path: str) -> str:
    cp = _docker("exec", cid, "cat", path, check=False)
    return cp.stdout if cp.returncode == 0 else ""


def _leftovers(project: str) -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={project}"
    found = {
        "containers": _docker("ps", "-a", "-q", "--filter", label).stdout.split(),
        "networks": _docker("network", "ls", "-q", "--filter", label).stdout.split(),
        "volumes": _docker("volume", "ls", "-q", "--filter", label).stdout.split(),
    }
    # and by name, whatever the labels (compose names everything <project>_...)
    found["named"] = [n for n in _docker("ps", "-a", "--format", "{{.Names}}").stdout.split()
                      + _docker("network", "ls", "--format", "{{.Name}}").stdout.split()
                      + _docker("volume", "ls", "--format", "{{.Name}}").stdout.split()
                      if n.startswith(f"{project}_") or n.startswith(f"{project}-")]
    return {k: v for k, v in found.items() if v}


def _own_for_app(certs: Path) -> None:
    """What the docs tell users (`sudo chown -R 49999:49999 certs`); without root, the test's
    throwaway keys are made readable instead."""
    for path in [certs, *certs.iterdir()]:
        if os.geteuid() == 0:
            os.chown(path, APP_UID, APP_UID)
        elif path.is_file():
            path.chmod(0o644)


@pytest.fixture(scope="module")
def compose_run(request: pytest.FixtureRequest) -> Iterator[ComposeOutcome]:
    if shutil.which("docker") is None:
        skip_or_fail("docker is not installed: the compose deployment was not run")
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/usr/local/bin"])
    if not (shutil.which("dockerd", path=search) or os.environ.get("DOCKER_HOST")
            or Path("/var/run/docker.sock").exists()):
        skip_or_fail("only the docker client is installed (no dockerd, no DOCKER_HOST): "
                     "the compose deployment was not run")
    base = _compose_command()
    if base is None:
        skip_or_fail("no Compose implementation (docker-compose or `docker compose`) is installed")
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                          text=True, timeout=60)
    if info.returncode != 0:
        pytest.fail("docker is installed but its daemon is not reachable (.ci/run starts dockerd when it "
                    f"is installed; start it as root: dockerd &): {info.stderr.strip()[-500:]}")

    workdir = Path(tempfile.mkdtemp(prefix="compose-test-"))
    project = f"fedsbtest{os.getpid()}"
    out = ComposeOutcome(workdir, project)
    t0 = time.monotonic()

    def mark(step: str, since: float) -> float:
        now = time.monotonic()
        out.timings[step] = round(now - since, 1)
        _say(f"{step}: {now - since:.1f} s")
        return now

    # 1. credentials, as a user makes them
    certs = workdir / "certs"
    cp = subprocess.run(["bash", str(GEN_CERTS), "--out", str(certs), "--nodes", str(SUPERNODES)],
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHON": sys.executable})
    assert cp.returncode == 0, cp.stdout + cp.stderr
    intruder = workdir / "intruder"  # a key pair the SuperLink never learns about
    intruder.mkdir()
    from fedsb.ops.deploy.credentials import generate_node_key

    generate_node_key(intruder, "supernode-x")
    _own_for_app(certs)
    _own_for_app(intruder)

    # 2. the images
    t = time.monotonic()
    cp = subprocess.run(["bash", str(BUILD_IMAGES), "--flwr-version", FLWR_VERSION], capture_output=True,
                        text=True, timeout=1500)
    out.build_log = cp.stdout + cp.stderr
    _say("images:\n" + out.build_log.strip())
    assert cp.returncode == 0, out.build_log[-4000:]
    t = mark("images", t)
    for image in (f"flwr/superlink:{FLWR_VERSION}", f"flwr/supernode:{FLWR_VERSION}",
                  f"flwr/superexec:{FLWR_VERSION}", "fedsb-superexec:latest"):
        out.images[image] = json.loads(_docker("image", "inspect", image).stdout)[0]

    # 3. up, on the host network
    superlink_port, *node_ports = free_ports(1 + SUPERNODES)
    runtime_ports = {f"supernode-{i + 1}": p for i, p in enumerate(node_ports)}
    override = workdir / "docker-compose.hostnet.yml"
    override.write_text(yaml.safe_dump(host_network_override(yaml.safe_load(COMPOSE.read_text()),
                                                             superlink_port, runtime_ports), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "SUPERLINK_ADDRESS"}  # the override's default counts
    env = {**env, "NUM_SUPERNODES": str(SUPERNODES), "FLWR_VERSION": FLWR_VERSION,
           "HF_HUB_OFFLINE": "1", "FEDSB_IMAGE_TAG": "latest"}
    compose_file = workdir / "docker-compose.yml"
    compose_file.write_text(without_port_publish(COMPOSE.read_text()))
    compose = Compose(base, project, workdir, [compose_file, override], env)
    home = workdir / "flwr-home"
    home.mkdir()
    write_connection(home, CONNECTION, f"127.0.0.1:{superlink_port}", root_certificates=certs / "ca.crt")
    logs = workdir / "logs"
    logs.mkdir()
    try:
        t = time.monotonic()
        cp = compose("up", "-d", "--no-build")
        _say("up:\n" + (cp.stdout + cp.stderr).strip())
        t = mark("up", t)
        out.online = _wait_online(home, SUPERNODES, timeout=240)
        _say("flwr supernode ls: " + ", ".join(f"{n.get('node-id')} {n.get('status')}" for n in out.online))
        t = mark("supernodes online", t)

        # 4. a SuperNode container whose key is not registered
        cp = _docker("run", "--rm", "--name", f"{project}-intruder", "--network", "host",
                     "-e", "FLWR_TELEMETRY_ENABLED=0", "-e", "FLWR_DISABLE_UPDATE_CHECK=1",
                     "-v", f"{certs / 'ca.crt'}:/certs/ca.crt:ro",
                     "-v", f"{intruder / 'supernode-x'}:/certs/supernode.key:ro",
                     f"flwr/supernode:{FLWR_VERSION}", "--superlink", f"127.0.0.1:{superlink_port}",
                     "--root-certificates", "/certs/ca.crt", "--auth-supernode-private-key",
                     "/certs/supernode.key", "--isolation", "process", "--host", "127.0.0.1",
                     "--port", str(free_ports(1)[0]), "--max-retries", "1", "--max-wait-time", "20",
                     "--node-config", "partition-id=1 num-partitions=2", timeout=180, check=False)
        out.refused = (cp.returncode, cp.stdout + cp.stderr)
        said = [ln for ln in out.refused[1].splitlines() if re.search(r"activate|exit code|error", ln, re.I)]
        _say(f"unregistered SuperNode container: exit code {cp.returncode}; it said:\n" + "\n".join(said))
        t = mark("unregistered supernode refused", t)

        # 5. run 1: one round, both SuperNodes
        run_config = {"config": TINY, "method": "fedsb", "num-rounds": 1, "node-wait-s": 60,
                      "run-dir": "/runs/run1", "overrides": f"federation.num_clients={SUPERNODES}"}
        run_id = _submit(home, workdir, "run1", run_config)
        out.run1 = _wait_run(home, run_id, timeout=600)
        _say(f"run 1 ({run_id}): {out.run1.get('status')}")
        t = mark("run 1 (submit to finished)", t)
        server = compose.container("superexec-serverapp")
        _docker("cp", f"{server}:/runs/run1", str(workdir / "run1"))
        out.run1_dir = workdir / "run1"

        # 6. run 2: supernode-2 is killed once round 1 is in
        overrides = f"federation.num_clients={SUPERNODES}; federation.round_timeout_s={ROUND_TIMEOUT_S}"
        run_config = dict(run_config, **{"num-rounds": 2, "run-dir": "/runs/run2", "overrides": overrides})
        run_id = _submit(home, workdir, "run2", run_config)
        victim = compose.container("supernode-2")

        def kill_after_round_1() -> None:
            if out.killed:
                return
            rows = _read_in_container(server, "/runs/run2/metrics.jsonl").splitlines()
            if len(rows) >= 2:  # round 0 (the initial evaluation) and round 1
                _docker("kill", victim)
                out.killed = {"after_rows": len(rows), "at_s": round(time.monotonic() - t, 1)}
                _say(f"killed supernode-2 ({victim[:12]}) after round 1")

        out.run2 = _wait_run(home, run_id, timeout=900, during=kill_after_round_1)
        _say(f"run 2 ({run_id}): {out.run2.get('status')}")
        cp = subprocess.run(["flwr", "log", str(run_id), CONNECTION, "--show"], capture_output=True,
                            text=True, env=_flwr_env(home), cwd=home, timeout=120)
        (logs / "run2.log").write_text(cp.stdout + cp.stderr)
        _say("run 2's log, the lines about clients:\n" + "\n".join(
            line for line in cp.stdout.splitlines()
            if re.search(r"fail|timed out|no reply|accepted|aggregat|clients connected", line, re.I))[-3000:])
        t = mark("run 2 (submit to finished, supernode-2 killed)", t)
        state = json.loads(_docker("inspect", victim).stdout)[0]["State"]
        out.killed.update(status=state["Status"], exit_code=state["ExitCode"],
                          restarts=json.loads(_docker("inspect", victim).stdout)[0]["RestartCount"])
        _docker("cp", f"{server}:/runs/run2", str(workdir / "run2"))
        out.run2_dir = workdir / "run2"
        _say(f"killed container: {out.killed}")
        for row in _metrics(out.run2_dir):
            _say(f"run 2 metrics.jsonl round {row['round']}: accepted {row.get('accepted')} "
                 f"failed {row.get('failed')} wall_s {row.get('wall_s')}")
        for service in ("superlink", "superexec-serverapp", "supernode-1", "supernode-2"):
            (logs / f"{service}.log").write_text(compose("logs", "--no-color", service, check=False).stdout)
    finally:
        # 7. down, and nothing of the project is left
        t = time.monotonic()
        (logs / "all.log").write_text(compose("logs", "--no-color", check=False).stdout)
        _docker("rm", "-f", f"{project}-intruder", check=False)
        down = compose("down", "-v", "--remove-orphans", check=False)
        mark("down -v", t)
        out.leftovers = _leftovers(project)
        out.timings["total"] = round(time.monotonic() - t0, 1)
        (workdir / "timings.json").write_text(json.dumps(out.timings, indent=2))
        _say(f"timings: {out.timings}; workdir {workdir}")
        assert down.returncode == 0, down.stdout + down.stderr
        assert not out.leftovers, f"left behind by `docker-compose down -v`: {out.leftovers}"
    failed_before = request.session.testsfailed
    yield out
    if request.session.testsfailed == failed_before:
        shutil.rmtree(workdir, ignore_errors=True)
    else:  # the certificates, the override, the logs and the run directories, for a look
        _say(f"kept {workdir}")


# ---------------------------------------------------------------------------------------------
# What the scenario saw
# ---------------------------------------------------------------------------------------------

def _comm_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "comm.csv", newline="") as f:
        return list(csv.DictReader(f))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_images_have_what_the_compose_file_relies_on(compose_run):
    """Official or stand-in: the entrypoints, user app (uid 49999), WORKDIR /app (the superlink-state
    volume), and the app image's writable /runs and /data/hf (the runs and hf-cache volumes)."""
    images = compose_run.images
    for name in ("superlink", "supernode", "superexec"):
        config = images[f"flwr/{name}:{FLWR_VERSION}"]["Config"]
        assert config["Entrypoint"] == [f"flower-{name}"]
        assert config["User"] == "app" and config["WorkingDir"] == "/app"
    app = images["fedsb-superexec:latest"]["Config"]
    assert app["Entrypoint"] == ["flower-superexec"] and app["User"] == "app"
    cp = _docker("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", "fedsb-superexec:latest",
                 "-c",
                 "id -u; stat -c '%u %n' /app /runs /data/hf; python -c 'import flwr, torch, fedsb; "
                 "print(flwr.__version__, torch.__version__)'")
    lines = cp.stdout.split("\n")
    assert lines[0] == str(APP_UID)
    assert lines[1:4] == [f"{APP_UID} /app", f"{APP_UID} /runs", f"{APP_UID} /data/hf"]
    assert lines[4].startswith(f"{FLWR_VERSION} 2.13.0"), cp.stdout


@pytest.mark.slow
def test_both_supernodes_joined(compose_run):
    online = [n for n in compose_run.online if n.get("status") == "online"]
    assert len(online) == SUPERNODES, compose_run.online


@pytest.mark.slow
def test_supernode_with_unregistered_key_is_refused(compose_run):
    code, log = compose_run.refused
    assert code not in (None, 0), f"the unregistered SuperNode was not refused (exit {code}): {log[-2000:]}"
    assert "Failed to activate SuperNode" in log, log[-2000:]


@pytest.mark.slow
def test_run_over_tls_completed_with_both_partitions_and_an_adapter(compose_run):
    assert compose_run.run1.get("status") == COMPLETED, compose_run.run1
    run_dir = compose_run.run1_dir
    rows = _comm_rows(run_dir)
    for client in ("0", "1"):
        up = [r for r in rows if r["client"] == client and r["direction"] == "up"]
        assert up and all(int(r["bytes"]) > 0 for r in up), f"partition {client} uploaded nothing"
    assert {r["client"] for r in rows} == {"0", "1"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["connected_clients"] == SUPERNODES
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file(), sorted(p.name for p in run_dir.iterdir())
    assert any(p.name.startswith("adapter_model") and p.stat().st_size > 0 for p in adapter.iterdir())


@pytest.mark.slow
def test_a_killed_supernode_is_recorded_and_the_run_completes_over_the_other(compose_run):
    killed = compose_run.killed
    assert killed.get("after_rows"), "supernode-2 was never killed (round 1 never showed in metrics.jsonl)"
    # `docker kill` counts as a manual stop: the on-failure restart policy does not bring it back
    assert killed["status"] == "exited" and killed["restarts"] == 0, killed
    assert compose_run.run2.get("status") == COMPLETED, compose_run.run2
    rows = _metrics(compose_run.run2_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert sorted(rows[1]["accepted"]) == [0, 1], rows[1]  # round 1: both, before the kill
    assert rows[2]["accepted"] == [0] and "1" in (rows[2]["failed"] or {}), rows[2]


@pytest.mark.slow
def test_down_leaves_nothing(compose_run):
    assert compose_run.leftovers == {}
