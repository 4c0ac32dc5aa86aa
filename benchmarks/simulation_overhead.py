"""What the Flower simulation costs over the same federated work done by a bare loop.

    python benchmarks/simulation_overhead.py [--config configs/default.yaml] [--set KEY=VALUE ...]
    python benchmarks/simulation_overhead.py --scale 1000 --scale 10000

Compare mode (the default) runs one config twice, one after the other, on a machine that should be
otherwise quiet (the load average is printed):
- **flower**: `fedsb run CONFIG` (SuperLink, SuperExec, `flwr-simulation`, Ray client actors), as a
  user runs it;
- **bare**: the same rounds in one process, `fedsb.federation.inprocess.run_in_process` with the
  ClientApp calls in a pool of as many worker processes as Ray starts client actors (cores //
  `--cpus-per-client`), each with `--cpus-per-client` torch threads: the same ServerApp and
  ClientApp code, clients, cohorts, steps and seed, without Flower's runtime.
It checks that both did the same work (every round's metrics and every metered byte equal) and
prints, for each, the wall time, the machine's CPU time, the time to the end of round 0 (the
initial evaluation) and the peak memory: the summed PSS of every process on the machine above
its value before the command (PSS shares pages such as torch's libraries among the processes
mapping them; summed RSS beside it), sampled every 0.5 s (`benchmarks/machine_probe.py`).

Sweep mode (`--sweep N`) runs `fedsb sweep` over N seeds of the config at 1 round (with `--before`,
the older checkout's sweep too) and prints the wall and CPU time per cell: on a small config, what
a cell costs beyond its run's own work.

Scale mode (`--scale N`, repeatable) runs `fedsb run` with N clients, 10 per round, 2 rounds and
20 examples per client, and prints the start-up time before round 1, the time per round and the
peak memory, with the processes that held the most memory at the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_probe import MachineProbe, Usage, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("wall_s",)  # per-row keys that are timings, not results


# The start-up of `fedsb run`, one line at a time: the first line (in the launcher's output or the run's
# flower.log) that holds each of these marks the step as done.
STARTUP_MARKS = (("checked", "rounds -> "), ("SuperLink up and run submitted", " submitted; log: "),
                 ("flwr-simulation started", "Starting Flower Simulation"),
                 ("ServerApp running", "partitions assigned"), ("round 0 evaluated", "] round 0: "))


class RoundClock:
    """Watches a run directory's metrics.jsonl: when each round's row appeared (seconds from start);
    and the launcher's log and flower.log: when each of STARTUP_MARKS first appeared."""

    def __init__(self, run_parent: Path):
        self.run_parent = run_parent
        self.times: list[float] = []
        self.marks: dict[str, float] = {}
        self._stop = threading.Event()

    def __enter__(self) -> RoundClock:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            files = list(self.run_parent.glob("**/metrics.jsonl"))
            rows = sum(1 for _ in files[0].open()) if files else 0
            while len(self.times) < rows:
                self.times.append(time.monotonic() - self._t0)
            if len(self.marks) < len(STARTUP_MARKS):
                logs = [self.run_parent / "benchmark.log", *self.run_parent.glob("**/flower.log")]
                text = "".join(f.read_text(errors="replace") for f in logs if f.is_file())
                for step, mark in STARTUP_MARKS:
                    if step not in self.marks and mark in text:
                        self.marks[step] = time.monotonic() - self._t0

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_flower(config: str, overrides: list[str], cpus_per_client: int, out: Path,
               code: Path | None = None) -> tuple[Usage, Path, list]:
    """`fedsb run`; with `code`, the fedsb of another checkout (its package and its Flower app)."""
    command = ["fedsb", "run", config, "--quiet", "--cpus-per-client", str(cpus_per_client),
               "--set", f"output_dir={out}", *[a for o in overrides for a in ("--set", o)]]
    env, cwd = None, ROOT
    if code is not None:  # its own copy of the config too (the keys a config may have change)
        command += ["--app", str(code)]
        env, cwd = {**os.environ, "PYTHONPATH": str(code)}, code
    return _measure(command, out, env, cwd)


def run_bare(config: str, overrides: list[str], cpus_per_client: int, workers: int, out: Path
             ) -> tuple[Usage, Path, list]:
    command = [sys.executable, __file__, "--bare-run", config, "--cpus-per-client", str(cpus_per_client),
               "--workers", str(workers), "--out", str(out), *[a for o in overrides for a in ("--set", o)]]
    return _measure(command, out)


def _measure(command: list[str], out: Path, env: dict | None = None, cwd: Path = ROOT
             ) -> tuple[Usage, Path, list]:
    out.mkdir(parents=True, exist_ok=True)
    log = out / "benchmark.log"
    with RoundClock(out) as clock, MachineProbe() as usage, log.open("w") as sink:
        done = subprocess.run(command, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=env)
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` failed (exit {done.returncode}): "
                         f"{log.read_text()[-1500:]}")
    run_dir = next(out.glob("**/summary.json")).parent
    usage.marks = clock.marks
    return usage, run_dir, clock.times


def bare_run(config: str, overrides: list[str], cpus_per_client: int, workers: int, out: Path) -> None:
    """The bare loop (in the child process the benchmark measures)."""
    from fedsb.experiment.config import parse_override
    from fedsb.experiment.rundir import run_dir_for, write_config
    from fedsb.federation.inprocess import run_in_process
    from fedsb.ops.launch import prepare_run

    given = {**dict(parse_override(o) for o in overrides), "output_dir": str(out)}
    resolved, _ = prepare_run(config, given, cpus_per_client)
    run_dir = run_dir_for(resolved)
    write_config(run_dir, resolved.to_dict())
    run_config = {"config": str(run_dir / "config.yaml"), "run-dir": str(run_dir), "assign-partitions": True}
    run_in_process(run_config, client_threads=cpus_per_client, client_processes=workers)


def same_work(flower_dir: Path, bare_dir: Path) -> str:
    """'identical' when every round's metrics (timings aside) and every metered byte are equal."""
    def rows(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
                for line in (run_dir / "metrics.jsonl").open()]

    if rows(flower_dir) != rows(bare_dir):
        return "DIFFERENT metrics"
    if (flower_dir / "comm.csv").read_text() != (bare_dir / "comm.csv").read_text():
        return "DIFFERENT bytes"
    return "identical metrics and bytes"


def _discovery(run_dir: Path) -> str:
    """The server's line on finding its clients (`fedsb.server`: assigned, or found by message)."""
    for line in (run_dir / "flower.log").read_text(errors="replace").splitlines():
        if "partitions assigned" in line or "clients found in" in line:
            return line.split(":", 1)[-1].strip()
    return "clients found: no line in flower.log (timed from the first round's start)"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _top(usage: Usage, count: int = 8) -> str:
    rows = usage.peak_processes[:count]
    return "\n".join(f"    {pss / 1e6:7.0f} MB  {command}" for _pid, pss, command in rows)


WORK_PROCESSES = ("flwr-simulation", "ClientAppActor")  # Flower's processes that run fedsb's apps


def _work_and_runtime(usage: Usage) -> str:
    """A Flower run's peak split into the processes running fedsb's ServerApp and ClientApps and the rest
    (the launcher, SuperLink, SuperExec, Ray's gcs_server, raylet, agents and monitors)."""
    work = sum(pss for _pid, pss, command in usage.peak_processes
               if any(name in command for name in WORK_PROCESSES))
    return (f"        of which the ServerApp and ClientApp processes {_gb(work)}; the launcher, SuperLink, "
            f"SuperExec and Ray's own processes {_gb(usage.peak_pss - work)}")


def compare(args: argparse.Namespace, work: Path) -> None:
    workers = max(1, (os.cpu_count() or 1) // args.cpus_per_client)
    print(f"machine: {machine_line()}")
    print(f"config: {args.config} {' '.join(args.set)}; {workers} client processes x {args.cpus_per_client} "
          "thread(s)", flush=True)
    results = {}
    runs = [("before", lambda *a: run_flower(*a, code=args.before))] if args.before else []
    runs += [("flower", run_flower), ("bare", lambda *a: run_bare(*a[:3], workers, a[3]))]
    for name, run in runs:
        usage, run_dir, times = run(args.config, args.set, args.cpus_per_client, work / name)
        results[name] = (usage, run_dir, times)
        rounds = ", ".join(f"{b - a:.1f}" for a, b in zip(times, times[1:], strict=False))
        print(f"{name:>6}: wall {usage.wall_s:6.1f} s, CPU {usage.cpu_s:6.1f} s, round 0 done at "
              f"{times[0] if times else float('nan'):5.1f} s, rounds {rounds} s, peak PSS "
              f"{_gb(usage.peak_pss)} (RSS {_gb(usage.peak_rss)})", flush=True)
        if name != "bare":
            print(_work_and_runtime(usage))
            print("        start-up: " + ", ".join(f"{step} at {t:.1f} s" for step, t in usage.marks.items()))
        if args.processes:
            print(_top(usage))
    bare = results["bare"][0]
    for name in [n for n in results if n != "bare"]:
        flower = results[name][0]
        print(f" {name} / bare: wall {flower.wall_s / bare.wall_s:.2f}x, "
              f"CPU {flower.cpu_s / bare.cpu_s:.2f}x, peak PSS {flower.peak_pss / bare.peak_pss:.2f}x; "
              f"{same_work(results[name][1], results['bare'][1])}")


def scale(args: argparse.Namespace, work: Path) -> None:
    print(f"machine: {machine_line()}")
    for clients in args.scale:
        overrides = [f"federation.num_clients={clients}", "federation.clients_per_round=10",
                     "federation.rounds=2", f"data.num_examples={20 * clients}", *args.set]
        for name, code in ([("before", args.before)] if args.before else []) + [("flower", None)]:
            out = work / f"scale-{clients}-{name}"
            usage, run_dir, times = run_flower(args.config, overrides, args.cpus_per_client, out, code)
            rounds = [f"{b - a:.1f}" for a, b in zip(times, times[1:], strict=False)]
            print(f"{name:>6}, {clients} clients: start-up to round 1 {times[0]:.1f} s "
                  f"({_discovery(run_dir)}), rounds {', '.join(rounds)} s, wall {usage.wall_s:.1f} s, "
                  f"peak PSS {_gb(usage.peak_pss)} (RSS {_gb(usage.peak_rss)})", flush=True)
            if args.processes:
                print(_top(usage))


def sweep(args: argparse.Namespace, work: Path) -> None:
    from fedsb.experiment.config import parse_override  # torch-free

    print(f"machine: {machine_line()}")
    print(f"config: {args.config} {' '.join(args.set)}, 1 round; a sweep of {args.sweep} cells (seeds)",
          flush=True)
    for name, code in ([("before", args.before)] if args.before else []) + [("flower", None)]:
        out = work / f"sweep-{name}"
        out.mkdir(parents=True, exist_ok=True)
        fixed = {"federation.rounds": 1, **dict(parse_override(o) for o in args.set)}
        spec = out / "sweep.yaml"
        base = str(((code or ROOT) / args.config).resolve())
        spec.write_text(json.dumps({"base": base, "output_dir": str(out / "runs"), "set": fixed,
                                    "grid": {"seed": list(range(args.sweep))}}))
        env = None if code is None else {**os.environ, "PYTHONPATH": str(code)}
        command = ["fedsb", "sweep", str(spec)] + (["--app", str(code)] if code is not None else [])
        with MachineProbe() as usage, (out / "benchmark.log").open("w") as sink:
            done = subprocess.run(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env)
        if done.returncode != 0:
            raise SystemExit(f"`{' '.join(command)}` failed (exit {done.returncode}); "
                             f"see {out / 'benchmark.log'}")
        print(f"{name:>6}: {args.sweep} cells in {usage.wall_s:.1f} s: {usage.wall_s / args.sweep:.1f} s and "
              f"{usage.cpu_s / args.sweep:.1f} CPU-s per cell, peak PSS {_gb(usage.peak_pss)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--scale", type=int, action="append", default=[], metavar="N",
                        help="scale mode: a run with N clients (repeatable)")
    parser.add_argument("--sweep", type=int, default=0, metavar="N",
                        help="sweep mode: a sweep of N cells (seeds) of the config at 1 round")
    parser.add_argument("--processes", action="store_true", help="print the largest processes at the peak")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    parser.add_argument("--before", type=Path, default=None, metavar="CHECKOUT",
                        help="also run `fedsb run` from another checkout (e.g. a git worktree of an older "
                             "commit), for before-and-after figures in one invocation")
    parser.add_argument("--bare-run", metavar="CONFIG", help=argparse.SUPPRESS)  # the measured child
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.before is not None:
        args.before = args.before.resolve()  # its runs have it as working directory and PYTHONPATH
    if args.bare_run:
        bare_run(args.bare_run, args.set, args.cpus_per_client, args.workers, args.out)
        return 0
    work = args.keep or Path(tempfile.mkdtemp(prefix="fedsb-overhead-"))
    try:
        (scale if args.scale else sweep if args.sweep else compare)(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
