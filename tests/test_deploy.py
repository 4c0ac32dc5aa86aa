"""The multi-node deployment: docker-compose.yml, the credentials, and a real loopback deployment.

Fast tests check the compose file (a real Compose implementation, and every Flower flag against
the installed flwr's own `--help`), the credentials (Python and scripts/gen-certs.sh) and the CLI
hook. The slow tests start real Flower processes on 127.0.0.1 (ports 41000-41999, FLWR_HOMEs
under /tmp/deploy-*): one deployment (SuperLink, 2 authorised SuperNodes, TLS, SuperNode
authentication, 2 rounds of Fed-SB on the tiny config, plus two SuperNodes that must be refused)
serves several tests; every process is stopped in the fixture's `finally`, and the fixture
checks that none is left.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import skip_or_fail

import fedsb.ops.deploy.cli as deploy_cli
from fedsb.ops.deploy.credentials import Credentials, generate_credentials
from fedsb.ops.deploy.local import CONNECTION, FINAL_OK, LocalDeployment
from fedsb.ops.flwr_cli import write_run_config
from fedsb.ops.processes import free_ports

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
GEN_CERTS = ROOT / "scripts" / "gen-certs.sh"
TINY = "tests/configs/tiny.yaml"  # relative to the app directory (shipped in the FAB)

needs_flower = pytest.mark.skipif(shutil.which("flower-superlink") is None,
                                  reason="the flwr commands (flower-superlink, ...) are not installed")


def _workdir(tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"deploy-{tag}-"))


def _group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# ---------------------------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------------------------

def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR} / $$ for the values we use (defaults, no environment)."""
    value = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    return value.replace("$$", "$")


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the `<<:` merge keys


def _dockerfile_entrypoint() -> list[str]:
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.startswith("ENTRYPOINT")]
    assert lines, "the Dockerfile sets no ENTRYPOINT"
    return json.loads(lines[-1].split(None, 1)[1])


def _flower_command_lines() -> list[tuple[str, list[str]]]:
    """(service, argv) of every Flower command in docker-compose.yml, interpolated with defaults."""
    out = []
    for name, svc in _compose()["services"].items():
        command = [_interpolate(str(a)) for a in svc.get("command", [])]
        image = _interpolate(str(svc.get("image", "")))
        entrypoint = svc.get("entrypoint")
        if entrypoint:
            script = " ".join(command)
            for match in re.finditer(r"flwr (supernode register)[^\n;|&]*", script):
                flags = re.findall(r"(--[\w-]+)", match.group(0))
                out.append((name, ["flwr", *match.group(1).split(), *flags]))
            continue
        if image.startswith("flwr/superlink:"):
            program = ["flower-superlink"]
        elif image.startswith("flwr/supernode:"):
            program = ["flower-supernode"]
        elif "build" in svc:
            program = _dockerfile_entrypoint()
        else:
            pytest.fail(f"service {name}: unknown image {image}")
        out.append((name, program + command))
    return out


_HELP: dict[tuple[str, ...], str] = {}


QUIET_FLOWER = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"}


def _help(program: tuple[str, ...]) -> str:
    if program not in _HELP:
        cp = subprocess.run([*program, "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **QUIET_FLOWER, "COLUMNS": "200", "NO_COLOR": "1",
                                 "TERM": "dumb"})
        assert cp.returncode == 0, f"{' '.join(program)} --help failed: {cp.stderr}"
        _HELP[program] = re.sub(r"\x1b\[[0-9;]*m", "", cp.stdout)
    return _HELP[program]


def _documented_flags(help_text: str) -> dict[str, str]:
    """--flag -> its help entry text, from an argparse or typer help page."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        m = re.match(r"^[\s│]*(?:-\w,? )?(--[a-z][\w-]*)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current:
            entries[current] += " " + line.strip()
    return entries


def test_compose_file_is_valid_for_docker_compose(tmp_path):
    binary = shutil.which("docker-compose")
    if binary is None:
        skip_or_fail("docker-compose is not installed (CI installs it: apt-get install docker-compose); "
                     "the file was not validated by a Compose implementation")
    cp = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    # And with more SuperNodes and another Flower version, as the file documents.
    cp = subprocess.run([binary, "-f", str(COMPOSE), "config"], capture_output=True, text=True, cwd=ROOT,
                        timeout=120, env={**os.environ, "NUM_SUPERNODES": "5", "FLWR_VERSION": "1.41.0"})
    assert cp.returncode == 0, cp.stderr
    rendered = yaml.safe_load(cp.stdout)
    assert "partition-id=1 num-partitions=5" in rendered["services"]["supernode-2"]["command"]
    # The documented GPU reservation, uncommented, is valid too.
    gpu = tmp_path / "docker-compose.gpu.yml"
    gpu.write_text(_uncomment_gpu_block(COMPOSE.read_text()))
    cp = subprocess.run([binary, "-f", str(gpu), "--project-directory", str(ROOT), "config"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert cp.returncode == 0, cp.stderr
    reservation = yaml.safe_load(cp.stdout)["services"]["superexec-clientapp-1"]["deploy"]["resources"]
    assert reservation["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def _uncomment_gpu_block(text: str) -> str:
    lines = text.splitlines()
    start = lines.index("  # deploy:")
    end = next(i for i in range(start, len(lines)) if "capabilities: [gpu]" in lines[i])
    for i in range(start, end + 1):
        lines[i] = lines[i].replace("  # ", "  ", 1)
    return "\n".join(lines) + "\n"


def test_compose_topology():
    services = _compose()["services"]
    assert services["superlink"]["image"] == "flwr/superlink:${FLWR_VERSION:-1.41.0}"
    supernodes = sorted(n for n in services if re.fullmatch(r"supernode-\d+", n))
    assert len(supernodes) >= 2
    for i, name in enumerate(supernodes):
        svc = services[name]
        assert svc["image"] == "flwr/supernode:${FLWR_VERSION:-1.41.0}"
        cmd = [str(a) for a in svc["command"]]
        assert cmd[cmd.index("--isolation") + 1] == "process"
        node_config = cmd[cmd.index("--node-config") + 1]
        assert node_config == f"partition-id={i} num-partitions=${{NUM_SUPERNODES:-2}}"
        assert {"--auth-supernode-private-key", "--root-certificates"} <= set(cmd) and "--insecure" not in cmd
        executor = services[f"superexec-clientapp-{i + 1}"]
        assert f"{name}:{cmd[cmd.index('--port') + 1]}" in [str(a) for a in executor["command"]]
        assert executor["shm_size"] and "hf-cache:/data/hf" in executor["volumes"]
        assert any(str(v).startswith("runs:") for v in executor["volumes"])
    link = [str(a) for a in services["superlink"]["command"]]
    assert {"--enable-supernode-auth", "--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"} <= set(link)
    assert link[link.index("--isolation") + 1] == "process" and "--insecure" not in link
    server = [str(a) for a in services["superexec-serverapp"]["command"]]
    assert "--root-certificates" in server and "--insecure" not in server
    assert "FROM flwr/superexec:${FLWR_VERSION}" in (ROOT / "Dockerfile").read_text()
    assert "ARG FLWR_VERSION=1.41.0" in (ROOT / "Dockerfile").read_text()


@needs_flower
def test_compose_flower_flags_are_accepted_by_the_installed_flwr():
    """Every flag is listed by the installed command's --help and not described as deprecated,
    and every whole command line parses."""
    lines = _flower_command_lines()
    programs = {tuple(argv[:1]) if argv[0] != "flwr" else tuple(argv[:3]) for _, argv in lines}
    assert {("flower-superlink",), ("flower-supernode",), ("flower-superexec",),
            ("flwr", "supernode", "register")} <= programs
    problems = []
    # `ARGV --help` exits 0 only if every value before --help is valid (choices, types, removed
    # flags that refuse any value) and prints the help page; command lines that differ only in
    # numbers (supernode-1, supernode-2, ...) are parsed once.
    unique: dict[tuple[str, ...], tuple[str, list[str]]] = {}
    for service, argv in lines:
        if argv[0] != "flwr":
            unique.setdefault(tuple(re.sub(r"\d+", "N", a) for a in argv), (service, argv))

    def parse(item: tuple[str, list[str]]) -> None:
        service, argv = item
        cp = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **QUIET_FLOWER, "COLUMNS": "200"})
        if cp.returncode != 0:
            problems.append(f"{service}: `{' '.join(argv)}` is rejected: {cp.stderr[-300:]}")
        else:
            _HELP.setdefault((argv[0],), re.sub(r"\x1b\[[0-9;]*m", "", cp.stdout))

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(parse, unique.values()))
    # the check below catches what older Flower compose files use
    superexec_flags = _documented_flags(_help(("flower-superexec",)))
    assert "--runtime-api-address" in superexec_flags and "--plugin-type" not in superexec_flags
    assert "deprecated" in _documented_flags(_help(("flower-superlink",)))["--fleet-api-address"].lower()
    for service, argv in lines:
        program = tuple(argv[:3]) if argv[0] == "flwr" else tuple(argv[:1])
        documented = _documented_flags(_help(program))
        for token in argv[len(program):]:
            if not token.startswith("--"):
                continue
            flag = token.split("=", 1)[0]
            if flag not in documented:
                problems.append(f"{service}: {flag} is not an option of `{' '.join(program)}`")
            elif "deprecated" in documented[flag].lower():
                problems.append(f"{service}: {flag} is deprecated in `{' '.join(program)}`")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------------------------

def _check_credentials(directory: Path, nodes: list[str], host_ip: str = "127.0.0.1") -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((directory / "server.pem").read_bytes())
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes,
                           ec.ECDSA(server.signature_hash_algorithm))
    assert server.issuer == ca.subject
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert host_ip in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert (directory / "server.key").stat().st_mode & 0o077 == 0
    for name in nodes:
        private = load_ssh_private_key((directory / name).read_bytes(), None)
        public = load_ssh_public_key((directory / f"{name}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name.startswith("secp")
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (directory / name).stat().st_mode & 0o077 == 0


def test_generate_credentials(tmp_path):
    creds = generate_credentials(tmp_path, hosts=("localhost", "127.0.0.1", "superlink"),
                                 node_names=["supernode-1", "supernode-2"])
    assert creds.ca_cert.is_file() and creds.node_key("supernode-1")[1].is_file()
    _check_credentials(tmp_path, ["supernode-1", "supernode-2"])


@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                    reason="scripts/gen-certs.sh needs openssl and ssh-keygen")
def test_gen_certs_script(tmp_path):
    out = tmp_path / "certs"
    cp = subprocess.run(["bash", str(GEN_CERTS), "--out", str(out), "--nodes", "2", "--host", "10.1.2.3"],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    _check_credentials(out, ["supernode-1", "supernode-2"], host_ip="10.1.2.3")
    ca_before = (out / "ca.crt").read_bytes()
    key_before = (out / "supernode-1.pub").read_bytes()
    cp = subprocess.run(["bash", str(GEN_CERTS), "--out", str(out), "--nodes", "3"], capture_output=True,
                        text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    # adding a node keeps the CA and the registered keys
    assert (out / "ca.crt").read_bytes() == ca_before and (out / "supernode-1.pub").read_bytes() == key_before
    _check_credentials(out, ["supernode-1", "supernode-2", "supernode-3"])


# ---------------------------------------------------------------------------------------------
# Small pieces and the CLI hook
# ---------------------------------------------------------------------------------------------

def test_parse_sets_and_run_config_file(tmp_path):
    sets = deploy_cli.parse_sets(["num-rounds=3", "method=fedsb", "node-wait-s=2.5", "flag=true",
                                  "output-dir=/tmp/a b", 'overrides="train.lr=0.1; seed=3"'])
    assert sets == {"num-rounds": 3, "method": "fedsb", "node-wait-s": 2.5, "flag": True,
                    "output-dir": "/tmp/a b", "overrides": "train.lr=0.1; seed=3"}
    with pytest.raises(ValueError):
        deploy_cli.parse_sets(["no-equals-sign"])
    path = write_run_config(tmp_path / "rc.toml", {**sets, "path": 'C:\\x "quoted"'})
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    assert tomllib.loads(path.read_text()) == {**sets, "path": 'C:\\x "quoted"'}


def test_cli_hook_arguments():
    parser = argparse.ArgumentParser()
    deploy_cli.add_arguments(parser)
    args = parser.parse_args(["--nodes", "3", "--config", "x.yaml", "--set", "num-rounds=2", "--no-tls"])
    assert (args.nodes, args.config, args.set, args.no_tls) == (3, "x.yaml", ["num-rounds=2"], True)
    assert deploy_cli.run(parser.parse_args(["--set", "broken"])) == 2  # a usage error, nothing started


def test_free_ports_are_in_the_deployment_range():
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(41000 <= p <= 41999 for p in ports)


# ---------------------------------------------------------------------------------------------
# Real deployments on loopback
# ---------------------------------------------------------------------------------------------

@dataclass
class DeploymentOutcome:
    workdir: Path
    run_id: int
    info: dict
    run_log: str
    run_dir: Path
    members: dict[str, int]                # authorised SuperNode name -> node id
    online_before_run: set[int]
    refused: dict[str, tuple[int | None, str]]  # refused SuperNode -> (exit code, its log)


@pytest.fixture(scope="module")
def deployment() -> DeploymentOutcome:
    """SuperLink + 2 authorised SuperNodes (partitions 0, 1 of a 3-client federation), TLS and
    SuperNode authentication, an unregistered SuperNode and a SuperNode without TLS (both claiming
    partition 2), then 2 rounds of Fed-SB on the tiny config."""
    if shutil.which("flower-superlink") is None:
        pytest.skip("the flwr commands are not installed")
    workdir = _workdir("test")
    dep = LocalDeployment(workdir, tls=True, auth=True, echo=lambda m: print(f"[deploy] {m}"))
    completed = False
    try:
        dep.start_superlink()
        dep.start_serverapp_superexec()
        members = [dep.add_supernode(i, 3) for i in range(2)]
        intruders = [
            dep.add_supernode(2, 3, name="supernode-unregistered", register=False, superexec=False,
                              max_retries=1, max_wait_time=20),
            dep.add_supernode(2, 3, name="supernode-no-tls", tls=False, superexec=False,
                              max_retries=1, max_wait_time=20),
        ]
        dep.wait_nodes_online(members, timeout=120)
        codes = {h.name: h.supernode.wait_exit(90) for h in intruders}
        refused = {h.name: (codes[h.name], h.supernode.output()) for h in intruders}
        online_before_run = dep.online_nodes()
        run_dir = workdir / "run"
        run_id = dep.submit(ROOT, {"config": TINY, "method": "fedsb", "num-rounds": 2,
                                   "run-dir": str(run_dir), "overrides": "federation.num_clients=3",
                                   "node-wait-s": 3})
        dep.stream_log(run_id)
        info = dep.wait_run(run_id, timeout=900)
        run_log = dep.save_log(run_id).read_text()
        completed = info.get("status") == FINAL_OK
        yield DeploymentOutcome(workdir, run_id, info, run_log, run_dir,
                                {h.name: h.node_id for h in members}, online_before_run, refused)
    finally:
        pids = [mp.pid for mp in dep.procs]
        dep.stop()
        left = [p for p in pids if not _group_gone(p)]
        assert not left, f"process groups still alive after stop(): {left}"
    if completed:  # keep the logs of a failed deployment for inspection
        shutil.rmtree(workdir, ignore_errors=True)


def _comm_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "comm.csv", newline="") as f:
        return list(csv.DictReader(f))


def _context(outcome: DeploymentOutcome) -> str:
    info = outcome.info
    return f"status {info.get('status')} {info.get('status-details')}; logs in {outcome.workdir}"


@pytest.mark.slow
def test_deployment_run_completed(deployment):
    assert deployment.info["status"] == FINAL_OK, _context(deployment)
    assert set(deployment.members.values()) <= deployment.online_before_run
    summary = json.loads((deployment.run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["method"] == "fedsb"


@pytest.mark.slow
def test_both_authorised_nodes_trained_and_were_metered(deployment):
    assert deployment.info["status"] == FINAL_OK, _context(deployment)
    rows = _comm_rows(deployment.run_dir)
    for client in ("0", "1"):
        for rnd in ("1", "2"):
            up = [r for r in rows if r["client"] == client and r["round"] == rnd and r["direction"] == "up"]
            assert up, f"client {client} uploaded nothing in round {rnd}"
            assert {r["component"] for r in up} >= {"lora_R"}  # Fed-SB uploads R only (plus the head)
            assert all(int(r["bytes"]) > 0 and int(r["wire_bytes"]) >= int(r["bytes"]) for r in up)
        down = [r for r in rows if r["client"] == client and r["direction"] == "down"]
        assert {"lora_R", "init"} <= {r["component"] for r in down}
    summary = json.loads((deployment.run_dir / "summary.json").read_text())
    assert summary["communication"]["up"]["bytes"] == sum(
        int(r["bytes"]) for r in rows if r["direction"] == "up")


@pytest.mark.slow
def test_unregistered_supernode_is_refused(deployment):
    code, log = deployment.refused["supernode-unregistered"]
    assert code not in (None, 0), f"the unregistered SuperNode was not refused (exit {code})"
    assert "Failed to activate SuperNode" in log, log[-2000:]
    assert len(deployment.online_before_run) == 2


@pytest.mark.slow
def test_supernode_without_tls_cannot_connect(deployment):
    code, log = deployment.refused["supernode-no-tls"]
    assert code not in (None, 0), f"the SuperNode without TLS was not refused (exit {code})"
    assert "Failed to initialize the connection to the SuperLink" in log, log[-2000:]
    assert "[code:" not in log  # refused at the connection, before any SuperLink API answered


@pytest.mark.slow
def test_run_went_on_with_the_authorised_nodes_only(deployment):
    assert deployment.info["status"] == FINAL_OK, _context(deployment)
    assert "2 of 3 clients connected; going on with partitions [0, 1]" in deployment.run_log
    assert {r["client"] for r in _comm_rows(deployment.run_dir)} == {"0", "1"}
    summary = json.loads((deployment.run_dir / "summary.json").read_text())
    assert summary["connected_clients"] == 2


@pytest.mark.slow
@needs_flower
@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                    reason="scripts/gen-certs.sh needs openssl and ssh-keygen")
def test_compose_credentials_and_registration_work_with_flwr_and_everything_stops_on_error():
    """scripts/gen-certs.sh's certificate and keys, registered by the compose file's own register
    script, let a SuperNode join a TLS + auth SuperLink; an exception inside the deployment stops
    every process it started."""
    workdir = _workdir("compose-creds")
    certs = workdir / "certs"
    subprocess.run(["bash", str(GEN_CERTS), "--out", str(certs), "--nodes", "2"], check=True,
                   capture_output=True, timeout=120)
    creds = Credentials(certs, certs / "ca.crt", certs / "server.pem", certs / "server.key")
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="deliberate"), \
            LocalDeployment(workdir, credentials=creds, echo=None) as dep:
        dep.start_superlink()
        script = _compose()["services"]["supernode-register"]["command"][0]
        script = script.replace("$$", "$").replace("superlink:8000", dep.superlink_address) \
            .replace("/certs/", f"{certs}/")
        home = workdir / "register-home"
        env = {k: v for k, v in dep.env().items() if k != "FLWR_HOME"} | {"HOME": str(home)}
        cp = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert cp.stdout.count("registered ") == 2
        again = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, env=env,
                               timeout=300)
        assert again.returncode == 0, again.stderr  # already registered keys are fine
        nodes = dep.flwr("supernode", "ls", CONNECTION)["nodes"]
        assert len(nodes) == 2
        node = dep.add_supernode(0, 2, key=(certs / "supernode-1", certs / "supernode-1.pub"))
        dep.wait_nodes_online([node], timeout=90)
        pids = [mp.pid for mp in dep.procs]
        assert all(mp.alive() for mp in dep.procs)
        raise RuntimeError("deliberate failure inside the deployment")
    assert pids and all(_group_gone(p) for p in pids)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slow
@needs_flower
def test_deploy_local_cli_stops_everything_on_sigterm(tmp_path):
    """`python -m fedsb.ops.deploy local` (what `fedsb deploy-local` runs) killed with SIGTERM while its
    SuperNodes are coming up leaves no Flower process behind."""
    workdir = _workdir("sigterm")
    proc = subprocess.Popen([sys.executable, "-m", "fedsb.ops.deploy", "local", "--nodes", "1", "--workdir",
                             str(workdir), "--quiet", "--config", str(ROOT / TINY)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "started superexec-supernode-1" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        seen.append(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(seen)
    assert proc.returncode == 130, text
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", text)]
    assert len(pids) >= 4, text  # superlink, serverapp superexec, supernode, its superexec
    assert all(_group_gone(p) for p in pids), text
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slow
@needs_flower
def test_a_supernode_killed_mid_run_does_not_stop_the_run():
    """Three SuperNodes; the third is killed once round 1 is in: the run completes over the other
    two, and the rounds after record the dead one as failed (federation.round_timeout_s)."""
    import time

    workdir = _workdir("kill")
    dep = LocalDeployment(workdir, tls=False, auth=False, echo=lambda m: print(f"[deploy] {m}"))
    try:
        dep.start_superlink()
        dep.start_serverapp_superexec()
        nodes = [dep.add_supernode(i, 3) for i in range(3)]
        dep.wait_nodes_online(nodes, timeout=120)
        run_dir = workdir / "run"
        run_id = dep.submit(ROOT, {"config": TINY, "method": "fedit", "num-rounds": 3,
                                   "run-dir": str(run_dir), "node-wait-s": 30,
                                   "overrides": "federation.num_clients=3; federation.round_timeout_s=40"})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # round 1 in metrics.jsonl: kill the third node
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.5)
        for process in (nodes[2].supernode, nodes[2].superexec):
            if process is not None:
                os.killpg(process.pid, signal.SIGKILL)
        info = dep.wait_run(run_id, timeout=600)
        assert info.get("status") == FINAL_OK, info
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2, 3]
        assert 2 in rows[1]["accepted"]  # alive in round 1 (another client's first, cold round may time out)
        for row in rows[2:]:  # dead from round 2: failed, and the round aggregated the others
            assert "2" in (row["failed"] or {}) and 2 not in row["accepted"] and row["accepted"], row
    finally:
        dep.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_stop_stops_everything_even_when_its_output_pipe_is_gone():
    """A deployment whose stdout went away (the terminal or the parent that read it closed: every print
    raises BrokenPipeError) still stops every process it started. Once, a killed test runner left a
    whole deployment running this way."""
    def broken_pipe(_message: str) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    workdir = _workdir("pipe")
    dep = LocalDeployment(workdir, tls=False, auth=False, echo=broken_pipe)
    try:
        started = [dep.spawn(f"sleeper-{i}", [sys.executable, "-c", "import time; time.sleep(300)"])
                   for i in range(2)]
        assert all(mp.alive() for mp in started)
        dep.stop(grace=2.0)
        assert all(_group_gone(mp.pid) for mp in started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
