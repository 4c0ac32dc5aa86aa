"""The `fedsb deploy-local` command and `python -m fedsb.ops.deploy {local,certs}`.

`add_arguments` and `run` are the `fedsb deploy-local` subcommand (registered in fedsb/cli.py);
`main` is `python -m fedsb.ops.deploy`, with `local` (the same command) and `certs` (the
credentials for docker-compose.yml or separate hosts; what scripts/gen-certs.sh runs).

The deployment machinery (and the experiment config) is imported inside the functions that use
it, so that `certs` runs with nothing but the cryptography package installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fedsb.ops.deploy.credentials import generate_credentials
from fedsb.ops.interrupts import handle_interrupts

COMPOSE_HOSTS = ("localhost", "127.0.0.1", "superlink")  # `superlink`: the compose service's name


def parse_sets(items: Sequence[str] | None) -> dict[str, object]:
    """`--set k=v` items into run-config overrides, values parsed as YAML (as `fedsb run --set`)."""
    from fedsb.experiment.config import parse_override

    return dict(parse_override(item) for item in items or ())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2, metavar="N",
                        help="SuperNodes to start, with partition ids 0..N-1 (default: %(default)s)")
    parser.add_argument("--config", metavar="PATH",
                        help="experiment YAML, passed to the app as its 'config' run-config value "
                             "(default: the app's own default)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="override a run-config value of the Flower app (repeatable), e.g. "
                             "--set num-rounds=3 --set method=fedsb")
    parser.add_argument("--app-dir", default=None, metavar="DIR",
                        help="the Flower app directory (default: the fedsb project root)")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="where certificates, keys, FLWR_HOMEs and logs go "
                             "(default: a new /tmp/deploy-*)")
    parser.add_argument("--no-tls", action="store_true",
                        help="plain HTTP between all processes (implies --no-auth)")
    parser.add_argument("--no-auth", action="store_true",
                        help="let any SuperNode join (no key registration)")
    parser.add_argument("--timeout", type=float, default=1800, metavar="S",
                        help="stop the run if it has not finished after S seconds (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the run's log while it runs")


def run(args: argparse.Namespace) -> int:
    """`fedsb deploy-local`: one deployment, one run; exit status 0 only if the run completed."""
    from fedsb.federation.apps import project_dir
    from fedsb.ops.deploy.local import deploy_local
    from fedsb.ops.processes import ProcessError

    try:
        overrides = parse_sets(args.set)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.nodes < 1:
        print("error: --nodes must be at least 1", file=sys.stderr)
        return 2
    if args.config:
        overrides["config"] = str(Path(args.config).resolve())
    # In a deployment every SuperNode is one client: the federation has --nodes clients, unless
    # the overrides say otherwise (then SuperNodes beyond those partitions are refused by the app).
    extra = str(overrides.get("overrides", ""))
    if "federation.num_clients" not in extra:
        overrides["overrides"] = "; ".join(p for p in (extra, f"federation.num_clients={args.nodes}") if p)
    app_dir = Path(args.app_dir) if args.app_dir else project_dir()
    if not (app_dir / "pyproject.toml").is_file():
        print(f"error: {app_dir} has no pyproject.toml (not a Flower app directory)", file=sys.stderr)
        return 2

    # SIGTERM and Ctrl-C raise an exception (later ones cannot cut the clean-up short); leaving
    # deploy_local's LocalDeployment stops every process it started. The exit status is 130 for both.
    try:
        with handle_interrupts():
            result = deploy_local(app_dir, nodes=args.nodes, run_config=overrides, workdir=args.workdir,
                                  tls=not args.no_tls, auth=not (args.no_auth or args.no_tls),
                                  timeout=args.timeout, stream=not args.quiet)
    except KeyboardInterrupt:
        print("[deploy] interrupted; every started process was stopped", file=sys.stderr)
        return 130
    except ProcessError as err:  # DeployError, FlwrError: a step failed, its message says which
        print(f"[deploy] error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"run-id": result.run_id, "status": result.status,
                      "status-details": result.status_details, "run-dir": str(result.run_dir),
                      "workdir": str(result.workdir),
                      "log": str(result.log_path), "elapsed-s": round(result.elapsed_s, 1)}, indent=2))
    return 0 if result.ok else 1


def add_certs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory")
    parser.add_argument("--nodes", type=int, default=2,
                        help="SuperNode key pairs supernode-1..N (default: %(default)s)")
    parser.add_argument("--host", action="append", default=None,
                        help="a name or IP the SuperLink is reached at (repeatable; "
                             f"default: {', '.join(COMPOSE_HOSTS)})")
    parser.add_argument("--days", type=int, default=365,
                        help="validity of the certificates (default: %(default)s)")
    parser.add_argument("--keep-existing", action="store_true",
                        help="keep a CA and SuperNode keys already in DIRECTORY (so registered keys stay "
                             "valid); the SuperLink certificate is remade every time")


def run_certs(args: argparse.Namespace) -> int:
    if args.nodes < 0:
        print("error: --nodes must be at least 0", file=sys.stderr)
        return 2
    hosts = args.host or list(COMPOSE_HOSTS)
    creds = generate_credentials(args.directory, hosts=hosts, days=args.days,
                                 node_names=[f"supernode-{i}" for i in range(1, args.nodes + 1)],
                                 keep_existing=args.keep_existing, echo=print)
    print(f"done: {creds.directory} holds the CA, the SuperLink certificate and {args.nodes} SuperNode "
          f"key pair(s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedsb.ops.deploy",
        description="Run the fedsb Flower app on Flower's deployment engine, as processes on this machine; "
                    "or write the deployment's credentials.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("local", help="the same as `fedsb deploy-local`"))
    add_certs_arguments(sub.add_parser("certs", help="write ca.crt, server.pem/.key and SuperNode key pairs"))
    args = parser.parse_args(argv)
    return run(args) if args.command == "local" else run_certs(args)
