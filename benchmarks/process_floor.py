"""What one fedsb process holds of its own before and during a client's work: the floor under a
simulation's memory, whatever runs it.

    python benchmarks/process_floor.py [--config configs/default.yaml]

Prints the process's private (anonymous) memory, Pss_Anon from /proc/self/smaps_rollup, after each
import a ClientApp process makes, then while it trains one client of the config (peak, sampled
every 10 ms) and after `fedsb.core.memory.release_free_memory`. Private pages cannot be shared with
another process (a Ray actor is started fresh, not forked), so every client process of a simulation
holds at least this much; shared library pages (PSS_File) come on top, split among the processes.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def private_mb() -> int:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Pss_Anon:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no Pss_Anon in /proc/self/smaps_rollup")


class Peak:
    """The largest private_mb() seen while the block runs."""

    def __enter__(self) -> Peak:
        self.mb, self._stop = private_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.mb = max(self.mb, private_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    print(f"{'python itself':45s} {private_mb():5d} MB private")
    for module in ("torch", "transformers.models.bert.modeling_bert", "flwr.clientapp", "clients.app"):
        before = private_mb()
        __import__(module)
        print(f"{'+ import ' + module:45s} {private_mb():5d} MB private (+{private_mb() - before})")
    import torch

    from fedsb.core.memory import release_free_memory
    from fedsb.experiment.config import load_config
    from fedsb.experiment.worker import Worker

    torch.set_num_threads(1)  # as a client actor with one CPU
    config = load_config(ROOT / args.config).with_clients(8)
    worker = Worker(config)
    global_state = worker.initial_state()
    worker.data  # noqa: B018 (loaded here, not inside the measured steps)
    release_free_memory()
    print(f"{'+ a Worker (its own model copy, data, init)':45s} {private_mb():5d} MB private")
    for client in range(3):
        with Peak() as peak:
            start = time.perf_counter()
            worker.train_client(client, dict(global_state), server_round=1)
        print(f"client {client}: {config.train.local_steps} steps in {time.perf_counter() - start:4.1f} s: "
              f"peak {peak.mb} MB private, {private_mb()} MB after (released)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
