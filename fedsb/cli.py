"""The `fedsb` command. Each subcommand is one `Subcommand` entry in SUBCOMMANDS.

The CLI only parses arguments and prints; the work is done by the library (`fedsb.experiment.comm`,
...). Every subcommand runs inside fedsb.ops.interrupts.handle_interrupts: Ctrl-C and SIGTERM raise an
exception, so what a command started is stopped, and the exit status is 128 + the signal number. To
add a subcommand (run, demo, sweep, plot), write its `add_arguments` and `run`
functions and append a `Subcommand` to SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fedsb.analysis.sweep.cli as sweep
import fedsb.ops.deploy.cli as deploy_cli
from fedsb.core.catalog import TASKS, TINY_MODELS, shipped_configs
from fedsb.core.init_choices import get_init, init_names
from fedsb.methods import get_method, method_names
from fedsb.ops.interrupts import exit_status, handle_interrupts, signal_name
from fedsb.ops.launch import add_launch_arguments

if TYPE_CHECKING:  # torch: imported by the commands that need it, when they run
    from torch import nn

    import fedsb.experiment.comm as comm

DEFAULT_RANK = 8
DEFAULT_REFERENCE = "fedsb"  # `fedsb comm` takes upload ratios against this method (--reference)


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit status


# fedsb comm ----------------------------------------------------------------------------------

def _comm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="default",
        help=f"a shipped architecture config ({', '.join(shipped_configs())}), a config JSON path, "
             f"a local model directory, 'default' (packaged MiniLM) or a tiny test model "
             f"({', '.join(TINY_MODELS)}); built on the meta device, no weights (default: %(default)s)")
    parser.add_argument(
        "--method", action="append", metavar="NAME",
        help=f"repeatable; one of {', '.join(method_names())}, or 'all' (default: all)")
    parser.add_argument(
        "--rank", action="append", metavar="R|METHOD=R",
        help=f"adapter rank: an integer for every method, or METHOD=R for one (repeatable, e.g. "
             f"--rank fedsb=200 --rank fedex=32) (default: {DEFAULT_RANK})")
    parser.add_argument("--targets",
                        help="comma-separated target module patterns (default: per architecture)")
    parser.add_argument("--clients", type=int, default=1, metavar="K",
                        help="clients sampled per round (default: %(default)s)")
    parser.add_argument("--bytes-per-element", type=int, default=4,
                        help="bytes per transmitted element, 4 = float32 (default: %(default)s)")
    parser.add_argument("--task", choices=TASKS,
                        help="classification (trained head) or causal_lm (no trained head); default: "
                             "causal_lm for architecture configs, classification otherwise")
    parser.add_argument("--num-labels", type=int, default=2,
                        help="classes of the classification head (default: %(default)s)")
    parser.add_argument("--init", choices=init_names(), metavar="NAME",
                        help=f"the adapter init of every method that accepts it ({', '.join(init_names())}); "
                             "the others keep their default, e.g. Fed-SB its lora_sb (default: each "
                             "method's own: kaiming, lora_sb)")
    parser.add_argument("--init-source", choices=("server", "clients", "pooled"), default="server",
                        help="where a gradient-based init's gradient (lora_sb, lora_ga) comes from; "
                             "'clients' adds each client's dense gradient upload as one-time 'init' "
                             "(default: %(default)s)")
    parser.add_argument("--reference", default=DEFAULT_REFERENCE, choices=method_names(),
                        help="the method that upload and download ratios are taken against "
                             "(default: %(default)s)")
    parser.add_argument("--client-ranks", metavar="R1,R2,...",
                        help="clients of different ranks (federation.client_ranks): also print what one "
                             "client of each rank sends and receives per round, for the methods that "
                             "take mixed ranks")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON instead of tables")


def parse_methods(values: Sequence[str] | None) -> list[str]:
    """--method values (repeatable, comma lists allowed, 'all') -> method names in order."""
    names: list[str] = []
    for value in values or ["all"]:
        for name in value.split(","):
            name = name.strip()
            for m in (method_names() if name == "all" else [name]):
                if m not in method_names():
                    raise ValueError(f"unknown method {m!r}; accepted: {', '.join(method_names())}, all")
                if m not in names:
                    names.append(m)
    return names


def parse_ranks(values: Sequence[str] | None, methods: Sequence[str]) -> dict[str, int]:
    """--rank values -> rank per method (METHOD=R wins over a plain R, which wins over the default)."""
    default, specific = DEFAULT_RANK, {}
    for value in values or []:
        name, sep, number = value.rpartition("=")
        if sep and name not in method_names():
            raise ValueError(f"--rank {value!r}: unknown method {name!r}; "
                             f"accepted: {', '.join(method_names())}")
        try:
            rank = int(number)
        except ValueError:
            raise ValueError(f"--rank {value!r}: expected an integer or METHOD=INTEGER") from None
        if rank <= 0:
            raise ValueError(f"--rank {value!r}: the rank must be positive")
        if sep:
            specific[name] = rank
        else:
            default = rank
    return {m: specific.get(m, default) for m in methods}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """Columns padded to width; `align` has one letter per column, 'l' (left) or 'r' (right)."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    lines = []
    for row in (header, *rows):
        cells = [str(c).ljust(w) if a == "l" else str(c).rjust(w)
                 for c, w, a in zip(row, widths, align, strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _params(n: int) -> str:
    from fedsb.experiment.comm import human_count

    return f"{n:,} ({human_count(n)})" if n >= 1000 else f"{n:,}"


def format_comm(target: comm.AccountingModel, task: str, targets: Sequence[str] | None,
                counts: dict[str, comm.CommCounts], reference: comm.CommCounts, num_clients: int,
                bytes_per_element: int) -> str:
    """The readable report of `fedsb comm`."""
    import fedsb.experiment.comm as comm
    from fedsb.core.models import find_target_modules

    model = target.model
    modules = find_target_modules(model, None if targets is None else tuple(targets))
    head_params = sum(math.prod(shape) for shape in comm.head_shapes(model).values())
    shown_targets = ", ".join(targets) if targets else "architecture defaults"
    out = [
        f"model {target.name}: {model.config.model_type}, {target.source}, meta device (no weights); "
        f"task {task}",
        f"targets: {shown_targets} -> {len(modules)} modules; trained head: "
        + (f"{head_params:,} params" if head_params else "none"),
        f"K = {num_clients} client(s) per round; {bytes_per_element} bytes per element; "
        "params: exact count (rounded); bytes in decimal units (1 MB = 10^6 B)",
        "",
        "Per round (every round; a client's first round adds the one-time init)",
    ]
    rows = []
    for name, c in counts.items():
        for d in comm.DIRECTIONS:
            first = d == "up"  # method, rank and init once per method
            rows.append([name if first else "", str(c.rank) if first else "", c.init if first else "", d,
                         _params(c.params(d)), comm.human_bytes(c.bytes(d)),
                         _params(c.params(d, all_clients=True)),
                         comm.human_bytes(c.bytes(d, all_clients=True)),
                         _params(c.init_params(d)), comm.human_bytes(c.init_bytes(d))])
    out.append(_table(["method", "rank", "init", "dir", "per client params", "bytes",
                       f"all K={num_clients} params", "bytes", "one-time init per client", "bytes"], rows,
                      "lrllrrrrrr"))
    local = sorted({c.init for c in counts.values() if get_init(c.init).local})
    if local:
        out.append(f"{', '.join(local)}: computed by every client from the pretrained weights it holds, "
                   "so the init sends nothing (no bytes, no privacy cost).")

    out += ["", "Per component, per client per round (params; init = once, first round only)"]
    present = {p for c in counts.values() for d in comm.DIRECTIONS for p in c.components(d, first_time=True)}
    shown = [p for p in comm.METER_COMPONENTS if p in present]
    rows = []
    for name, c in counts.items():
        for d in comm.DIRECTIONS:
            parts = c.components(d, first_time=True)
            rows.append([name if d == "up" else "", d, *(f"{parts.get(p, 0):,}" for p in shown)])
    out.append(_table(["method", "dir", *shown], rows, "ll" + "r" * len(shown)))

    ref_label = get_method(reference.method).label
    out += ["", f"Upload per client per round relative to {ref_label} (r={reference.rank}: "
                f"{_params(reference.up)} params)"]
    rows = [[name, str(c.rank), f"{c.up / reference.up:,.2f}x", f"{c.down / reference.down:,.2f}x"]
            for name, c in counts.items()]
    out.append(_table(["method", "rank", f"upload vs {reference.method}", f"download vs {reference.method}"],
                      rows, "lrrr"))

    for name, c in counts.items():  # a residual method: what its download would be, sent factored
        method = comm.method_for_model(model, name, c.rank, targets, init=c.init)
        if not method.residual:
            continue
        factored = comm.factored_residual_params(method, num_clients)
        adapter_up = sum(v for k, v in c.components("up").items() if k in method.trainable)
        dense = c.components("down").get("residual", 0)
        out += [
            "",
            f"{method.label}: this simulator sends the dense accumulated residual (m x n per module) in "
            "every",
            f"  download: {_params(dense)} params per client per round.",
            f"  Sent in factored form instead (the stacked B_i and A_i of all K={num_clients} clients, rank "
            f"K*r={num_clients * c.rank}),",
            f"  each client would download K*r*(m+n) = {_params(factored)} params per round, which is also",
            f"  K x one client's A_i, B_i upload ({_params(adapter_up)}); that is "
            f"{factored / reference.down:,.2f}x {ref_label}'s per-round download.",
            "  The Fed-SB paper counts FedEx-LoRA this way; see docs/communication.md.",
        ]
    return "\n".join(out)


def _comm_run(args: argparse.Namespace) -> int:
    import fedsb.experiment.comm as comm

    methods = parse_methods(args.method)
    ranks = parse_ranks(args.rank, [*methods, args.reference])
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    if args.clients <= 0 or args.bytes_per_element <= 0:
        raise ValueError("--clients and --bytes-per-element must be positive")
    target = comm.accounting_model(args.model, args.task, args.num_labels)
    task = args.task or comm.default_task(args.model)
    init_gradients = args.init_source == "clients"
    counts = comm.count_methods(target.model, methods, ranks, targets, args.clients, args.bytes_per_element,
                                init_gradients, args.init)
    reference = counts.get(args.reference) or comm.count_methods(
        target.model, [args.reference], ranks, targets, args.clients, args.bytes_per_element,
        init_gradients, args.init)[args.reference]
    by_rank = client_rank_counts(target.model, counts, targets, args)
    if args.json:
        report = {"model": args.model, "task": task, "counts": {m: c.to_dict() for m, c in counts.items()}}
        if by_rank:
            report["client_ranks"] = {m: {str(r): c.to_dict() for r, c in per.items()}
                                      for m, per in by_rank.items()}
        print(json.dumps(report, indent=2))
    else:
        print(format_comm(target, task, targets, counts, reference, args.clients, args.bytes_per_element))
        if by_rank:
            print(format_client_ranks(by_rank))
    return 0


def client_rank_counts(model: nn.Module, counts: dict[str, comm.CommCounts], targets: list[str] | None,
                       args: argparse.Namespace) -> dict[str, dict[int, comm.CommCounts]]:
    """--client-ranks: per method that takes mixed ranks, the counts of one client of each rank."""
    import fedsb.experiment.comm as comm

    if not args.client_ranks:
        return {}
    try:
        ranks = sorted({int(r) for r in args.client_ranks.split(",") if r.strip()})
    except ValueError:
        raise ValueError(f"--client-ranks: got {args.client_ranks!r}; accepted: comma-separated "
                         "integers") from None
    out = {}
    for name, c in counts.items():
        if not get_method(name).rank_aggregations:
            continue
        bad = [r for r in ranks if not 1 <= r <= c.rank]
        if bad:
            raise ValueError(f"--client-ranks: {bad} outside 1..{c.rank} (the global rank of {name})")
        out[name] = {r: comm.count(model, name, c.rank, targets, args.clients, args.bytes_per_element,
                                   args.init_source == "clients", c.init, client_rank=r) for r in ranks}
    return out


def format_client_ranks(by_rank: dict[str, dict[int, comm.CommCounts]]) -> str:
    import fedsb.experiment.comm as comm

    out = ["", "Clients of different ranks: one client of rank r_i per round (it exchanges the rank-r_i "
               "prefix of A and B; fedsb.methods.ranks)"]
    rows = []
    for name, per in by_rank.items():
        for r, c in per.items():
            rows.append([name, str(c.rank), str(r), _params(c.up), comm.human_bytes(c.bytes("up")),
                         _params(c.down), comm.human_bytes(c.bytes("down")),
                         _params(c.init_params("down")), comm.human_bytes(c.init_bytes("down"))])
    out.append(_table(["method", "global rank", "client rank", "up params", "bytes", "down params", "bytes",
                       "one-time init", "bytes"], rows, "lrrrrrrrr"))
    return "\n".join(out)


# fedsb demo ----------------------------------------------------------------------------------

DEMO_SETTINGS = {  # small enough to finish in a few minutes on 2 CPU cores
    "data.num_examples": 1200, "data.max_test_examples": 300, "model.max_length": 32,
    "federation.num_clients": 4, "federation.clients_per_round": 1.0, "federation.rounds": 2,
    "train.local_steps": 8, "method.rank": 8,
}


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", action="append", choices=[*method_names(), "all"],
                        help="method(s) to run (repeatable; default: every registered method)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set federation.rounds=3 (repeatable)")
    parser.add_argument("--config", default="configs/default.yaml",
                        help="the experiment's YAML file, before the demo's settings and --set")


def _demo_run(args: argparse.Namespace) -> int:
    from fedsb.experiment.config import parse_override
    from fedsb.experiment.run_config import format_override_list
    from fedsb.federation.inprocess import run_in_process

    overrides = dict(DEMO_SETTINGS)
    overrides.update(parse_override(item) for item in args.set)
    print("fedsb demo: the methods side by side on the packaged MiniLM and the generated topic task; the "
          "real ServerApp and ClientApp, in one process (no SuperLink)", flush=True)
    finals = {}
    for name in parse_methods(args.method):
        run_config = {"config": args.config, "method": name, "overrides": format_override_list(overrides)}
        finals[name] = run_in_process(run_config)[1].summary
    print("\nmethod  test accuracy  bytes up (all rounds)  bytes down (all rounds)  run directory")
    for name, s in finals.items():
        print(f"{name:<6}  {s.test_accuracy:>13.3f}  {s.bytes_total('up'):>21,}  "
              f"{s.bytes_total('down'):>23,}  {s.run_dir}")
    return 0


# fedsb run -----------------------------------------------------------------------------------

def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="the experiment's YAML file, e.g. configs/default.yaml (with --resume: "
                             "optional, checked against the run's own)")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue a stopped run from its last checkpoint (its own config.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set method.name=ffa --set federation.rounds=3 "
                             "(repeatable)")
    add_launch_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    parser.add_argument("--check", action="store_true",
                        help="check the config, data, model and resources, print the run's plan and exit "
                             "(no training, no Flower process)")


def _run_run(args: argparse.Namespace) -> int:
    from fedsb.experiment.config import parse_override
    from fedsb.ops.launch import DEFAULT_ENGINE, ENGINES, prepare_run

    overrides = dict(parse_override(item) for item in args.set)
    if args.config is None and args.resume is None:
        raise ValueError("a config file is needed (e.g. configs/default.yaml), or --resume RUN_DIR")
    if args.check:
        from fedsb.experiment.plan import format_plan

        _config, plan = prepare_run(args.config, overrides, args.cpus_per_client, args.gpus_per_client)
        print(format_plan(plan))
        print(f"fedsb run --check: {args.config} is ready to run")
        return 0
    runner = ENGINES[args.engine or DEFAULT_ENGINE]
    outcome = runner(args.config, overrides, app_dir=args.app, cpus_per_client=args.cpus_per_client,
                     gpus_per_client=args.gpus_per_client, resume=args.resume,
                     stream=not args.quiet, echo=lambda line: print(line, flush=True))
    return 0 if outcome.ok else 1


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("run", "one Flower simulation (flwr run) of a config; waits for the run's final status",
               _run_arguments, _run_run),
    Subcommand("deploy-local", "run the app on a local SuperLink + N SuperNodes (process isolation, TLS, "
               "SuperNode authentication)", deploy_cli.add_arguments, deploy_cli.run),
    Subcommand("comm", "closed-form communication per method: parameters and bytes per round, "
               "per client and for all K clients, and one-time init", _comm_arguments, _comm_run),
    Subcommand("demo", "a short in-process run of the methods side by side on the packaged MiniLM",
               _demo_arguments, _demo_run),
    Subcommand("sweep", "a grid of real runs (as fedsb run) over config keys; one sweep.csv row per cell, "
               "resumable", sweep.add_arguments, sweep.run),
    Subcommand("plot", "figures (PNG, SVG) and report.md for a sweep or a run directory",
               lambda parser: _plots().add_arguments(parser), lambda args: _plots().run(args)),
]


def _plots():
    import fedsb.analysis.plots.cli as plots  # matplotlib

    return plots


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given argv, only the command it names gets its arguments (some of them import
    matplotlib or list model configs), so that `fedsb run` starts light."""
    parser = argparse.ArgumentParser(prog="fedsb", description="Federated fine-tuning simulator.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    named = None if argv is None else next((a for a in argv if not a.startswith("-")), None)
    for command in SUBCOMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        if named is None or named == command.name:
            command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedsb` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        # SIGINT and SIGTERM become an exception: every command stops what it started (its
        # `finally` blocks and context managers run) and exits with 128 + the signal number.
        with handle_interrupts():
            return args._run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"fedsb {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"fedsb {args.command}: interrupted ({signal_name(exit_status(err) - 128)})", file=sys.stderr)
        return exit_status(err)


if __name__ == "__main__":
    sys.exit(main())
