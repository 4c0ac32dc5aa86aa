"""The server's evaluation in file order and in length order: token positions, time, same numbers.

    python benchmarks/evaluation_order.py [--config configs/sst2.yaml] [--threads 1] [--repeats 1]

Builds the SST-2 study's validation split (configs/sweeps/sst2.yaml's data settings: 2,000 examples
held out of a 24,000-row subsample) and evaluates the model with its adapters on it twice per
repeat: in batches of `eval.batch_size` in file order (each trimmed to its longest row), the
baseline, and in `evaluation_batches`' length order. Prints the token positions each holds, the
mean time of each, and the two results; exits 1 if the accuracies differ or the losses differ by
more than 1e-6 relative.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from fedsb.data.tokens import evaluation_batches, iterate_batches
from fedsb.experiment.config import load_config
from fedsb.experiment.worker import get_worker
from fedsb.training.local import evaluate

STUDY = {"data.num_examples": 24000, "data.val_fraction": 0.1, "data.max_val_examples": 2000,
         "method.name": "fedit", "method.rank": 8}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sst2.yaml")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config, STUDY)
    worker = get_worker(config)
    tokens, size = worker.validation_tokens, config.eval.batch_size
    lengths = tokens["attention_mask"].sum(1)
    print(f"validation: {len(lengths)} examples, {int(lengths.sum())} tokens "
          f"(mean {lengths.float().mean():.1f}, longest {int(lengths.max())}); batches of {size}; "
          f"{args.threads} thread(s)")
    results = {}
    for name, batches in (("file order", lambda: iterate_batches(tokens, size, shuffle=False)),
                          ("length order", lambda: evaluation_batches(tokens, size))):
        positions = sum(batch["input_ids"].numel() for batch in batches())
        start = time.perf_counter()
        for _ in range(args.repeats):
            results[name] = evaluate(worker.model, batches())
        seconds = (time.perf_counter() - start) / args.repeats
        print(f"{name:>12}: {positions:>7} token positions, {seconds:6.1f} s, "
              f"accuracy {results[name]['accuracy']:.4f}, loss {results[name]['loss']:.8f}")
    a, b = results["file order"], results["length order"]
    same = a["accuracy"] == b["accuracy"] and abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"])
    print("same results" if same else "RESULTS DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
