"""Checkpoint size and time to resume, for a config: the run is stopped in a round and resumed.

    python benchmarks/resume_check.py [--config configs/default.yaml] [--stop-round 3] [--out DIR]

Runs the real ServerApp and ClientApp in one process (`fedsb.federation.inprocess`), stops the server
in the middle of `--stop-round` (as a crash would), prints the checkpoint's files and sizes, then
resumes the run from it and prints how long the resumed run took to finish.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from fedsb.federation.inprocess import run_in_process


class Stop(RuntimeError):
    """The server stops in the middle of a round."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--stop-round", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/resume-check"))
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)

    def stop(pid, reply):
        if reply.metadata.group_id == str(args.stop_round):
            raise Stop(f"stopped in round {args.stop_round}")
        return reply

    run_config = {"config": args.config, "run-dir": str(args.out)}
    start = time.perf_counter()
    try:
        run_in_process(run_config, tamper=stop)
    except Stop:
        pass
    stopped_s = time.perf_counter() - start
    files = {p.name: p.stat().st_size for p in sorted((args.out / "checkpoint").iterdir())}
    print(f"stopped in round {args.stop_round} after {stopped_s:.0f} s; checkpoint: "
          + ", ".join(f"{name} {size:,} B" for name, size in files.items())
          + f"; total {sum(files.values()):,} B")
    start = time.perf_counter()
    run_in_process({**run_config, "resume": True})
    print(f"resumed and finished in {time.perf_counter() - start:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
