"""Does the code still produce a recorded run? Rerun a run directory's own config and compare.

    python benchmarks/rerun_check.py RUN_DIR [--out DIR]

Reruns RUN_DIR/config.yaml through the real ServerApp and ClientApp in one process (one thread per
client, as `fedsb run` gives each virtual client; `fedsb.federation.inprocess`, which gives the same
run as `flwr run` to the bit) and compares each round of metrics.jsonl with the recorded one:
validation accuracy and loss, bytes up and down. Prints the rounds side by side and exits 0 when
all are equal (loss to 1e-6), 1 otherwise. For checking that a change left the figures of
the docs (docs/*.md, benchmarks/README.md) true without rerunning a whole sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from fedsb.analysis.sweep.runner import kept_paths
from fedsb.experiment.run_config import format_override_list
from fedsb.federation.inprocess import run_in_process

FIELDS = ("val_accuracy", "val_loss", "bytes_up", "bytes_down")


def rows(run_dir: Path) -> list[dict]:
    # Read as plain JSON: a run recorded before a schema change still compares on these fields.
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=0, abs_tol=1e-6)
    return a == b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where the rerun goes (default: a temp dir)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="fedsb-rerun-"))
    # A study's kept cell names its data relative to its own directory: rerun it with those paths.
    overrides = format_override_list(kept_paths(args.run_dir))
    run_in_process({"config": str((args.run_dir / "config.yaml").resolve()), "run-dir": str(out),
                    "overrides": overrides}, client_threads=1)
    recorded, rerun = rows(args.run_dir), rows(out)
    ok = len(recorded) == len(rerun)
    print(f"round  {'recorded val acc / loss / up / down':>48}  {'rerun':>48}")
    for old, new in zip(recorded, rerun, strict=False):
        equal = all(same(old.get(f), new.get(f)) for f in FIELDS)
        ok &= equal
        print(f"{old['round']:>5}  " + "  ".join(
            f"{r['val_accuracy']:.4f} {r['val_loss']:.6f} {r['bytes_up']:>11,} {r['bytes_down']:>11,}"
            for r in (old, new)) + ("" if equal else "  DIFFERS"))
    print(f"rerun_check: {args.run_dir}: {'identical' if ok else 'DIFFERENT'} ({len(rerun)} rows)")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
