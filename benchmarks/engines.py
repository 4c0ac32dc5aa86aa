"""The two engines on one study cell: wall time, start-up and time per round, and the same results.

    python benchmarks/engines.py [--config configs/sst2.yaml] [--set KEY=VALUE ...] [--rounds 2]

Runs the same config through `fedsb run --engine flower` (a private SuperLink, Ray's client actors)
and `fedsb run --engine inprocess` (the in-process grid, one client worker process per core), one
after the other, and prints for each: the whole command's wall time, the time until round 0's
evaluation ended (start-up: checks, data, model, init, the engine's own processes) and the mean time
of a training round (clients' steps, aggregation, evaluation). Exits 1 if the two runs' metrics.jsonl
rows differ (timing fields aside): the in-process engine must run the Flower run. The default cell is
the SST-2 study's (configs/sweeps/sst2.yaml) at FedIT r=8, shortened to --rounds rounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY = {"data.num_examples": 24000, "data.val_fraction": 0.1, "data.max_val_examples": 2000,
         "train.local_steps": 10, "method.name": "fedit", "method.rank": 8, "train.lr": 0.003}
TIMING = ("wall_s",)


def run(engine: str, config: str, overrides: dict[str, object], out: Path) -> tuple[float, Path]:
    args = [sys.executable, "-m", "fedsb.cli", "run", config, "--engine", engine, "--quiet",
            "--set", f"output_dir={out / engine}"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    start = time.monotonic()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    (run_dir,) = (out / engine).iterdir()
    return time.monotonic() - start, run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sst2.yaml")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {**STUDY, "federation.rounds": args.rounds}
    overrides.update(item.split("=", 1) for item in args.set)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="fedsb-engines-") as tmp:
        for engine in ("flower", "inprocess"):
            wall, run_dir = run(engine, args.config, overrides, Path(tmp))
            rows[engine] = metrics(run_dir)
            done = rows[engine]
            in_rounds = done[-1]["wall_s"] - done[0]["wall_s"]  # the ServerApp's clock, rounds 1..R
            print(f"{engine:<9}  wall {wall:7.1f} s = outside the rounds {wall - in_rounds:6.1f} s "
                  f"(start-up, round 0's evaluation, test, teardown) + {len(done) - 1} rounds of "
                  f"{in_rounds / (len(done) - 1):5.1f} s", flush=True)
    same = [{k: v for k, v in r.items() if k not in TIMING} for r in rows["flower"]] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in rows["inprocess"]]
    print("the same metrics every round:", "yes" if same else "NO")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
