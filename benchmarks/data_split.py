"""Holding out a stratified split: `fedsb.data.sources.split_train_test` against `datasets`' own
`train_test_split(stratify_by_column="label")`, on the same data in the same run, and whether they
split the same.

    python benchmarks/data_split.py [--sst2 ../shared/data/sst2/train.tsv]

The generated 4-topic task at 20,000 examples (the 1000-client scale benchmark's size), and SST-2's
67,349 training sentences where the file is there (skipped, saying so, where it is not).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fedsb.data.sources import load_file, split_train_test  # noqa: E402
from fedsb.data.synthetic import synthetic_dataset  # noqa: E402


def compare(name: str, ds) -> None:
    start = time.perf_counter()
    train, test = split_train_test(ds, 0.2, seed=0)
    fedsb_s = time.perf_counter() - start
    start = time.perf_counter()
    expected = ds.train_test_split(test_size=0.2, seed=0, stratify_by_column="label")
    datasets_s = time.perf_counter() - start
    same = train["text"][:] == expected["train"]["text"][:] and test["text"][:] == expected["test"]["text"][:]
    print(f"{name}: {len(ds):,} rows: datasets {datasets_s:.2f} s, fedsb {fedsb_s:.2f} s; "
          f"{'the same split' if same else 'DIFFERENT SPLITS'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sst2", type=Path, default=ROOT.parent / "shared/data/sst2/train.tsv")
    args = parser.parse_args(argv)
    compare("generated task", synthetic_dataset(20_000, num_classes=4, seed=0))
    if args.sst2.is_file():
        compare("SST-2 train", load_file(args.sst2, text_column="sentence")[0])
    else:
        print(f"SST-2: {args.sst2} not found, skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
