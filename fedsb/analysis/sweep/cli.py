"""`fedsb sweep SWEEP.yaml`: its arguments and what it prints."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from fedsb.analysis.sweep.runner import run_sweep
from fedsb.analysis.sweep.spec import load_sweep
from fedsb.analysis.sweep.table import SWEEP_CSV, latest_rows, read_rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`fedsb sweep` arguments."""
    parser.add_argument("sweep", help="the sweep file, e.g. configs/sweeps/privacy.yaml")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the cells and their status in sweep.csv; run nothing")
    parser.add_argument("--stream", action="store_true",
                        help="stream each run's Flower log (always kept in <run dir>/flower.log)")
    from fedsb.ops.launch import add_launch_arguments

    add_launch_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """`fedsb sweep`: 0 if every cell is completed, 1 if any failed (via main: 2 for a bad sweep file,
    128 + the signal number when Ctrl-C or SIGTERM stopped it, its running cell recorded as interrupted)."""
    if args.dry_run:
        spec = load_sweep(args.sweep)
        latest = latest_rows(read_rows(spec.output_dir / SWEEP_CSV)[1])
        cells = spec.cells()
        _print(f"fedsb sweep: {len(cells)} cells ({spec.shape}) on {spec.base} -> {spec.output_dir}"
               + (f"; {spec.tune} chosen per group on validation accuracy" if spec.tune else ""))
        for cell in cells:
            status = latest.get(cell.label, {}).get("status", "not run")
            _print(f"[{cell.index}/{len(cells)}] {status:<18} {cell.label}")
        return 0
    # The bar on a terminal only: in a log file its redraws would be noise beside the per-cell lines.
    result = run_sweep(args.sweep, stream=args.stream, cpus_per_client=args.cpus_per_client,
                       gpus_per_client=args.gpus_per_client, app_dir=args.app, engine=args.engine,
                       echo=_print, progress=sys.stderr if sys.stderr.isatty() else None)
    return 1 if result.failed else 0


def _print(line: str) -> None:
    """A line on stdout, above the progress bar (tqdm.write clears and redraws it)."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
