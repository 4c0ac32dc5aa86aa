"""GPU check of the real apps: fedsb's ServerApp and ClientApp on one CUDA GPU, causal-LM tuning.

    python benchmarks/gpu_apps_check.py [--clients 8] [--rounds 2] [--steps 4] [--dp] [--methods M[:INIT],...]

On a machine without CUDA it says so and exits 0 (`--tiny` runs the same on a 2-layer model on the CPU:
a check of the script, not a measurement). On a GPU it writes a TinyLlama-1.1B-shaped causal LM with
random weights (no download) and the packaged MiniLM's tokenizer to a temporary directory, then runs,
for each method, one whole fedsb run of the generated arithmetic instruction task through
`fedsb.federation.inprocess.run_in_process`: the real ServerApp and ClientApp, `--clients` virtual
clients sharing the one base model on the GPU (bfloat16 base, float32 adapters), the server's
validation exact match by greedy generation every round, the test split at the end, the run
directory. With `--dp` it also runs the first method under DP-SGD (Opacus) on the GPU. A method may
name its init (`--methods fedit:pissa,ffa:olora,fedex:lora_ga`; `method.init.name`).

It prints, per method: seconds per round (training and evaluation together), the GPU memory peak of
the round (the clients' training and the server's evaluation, from each round's `gpu_peak_bytes`),
bytes up and down per round, and the exact match (near 0: random weights; the point is that it runs).
On a GPU machine without network access Flower's Ray may not be installable, so the clients run in
one process, as `fedsb demo` runs them; the round loop is the one `flwr run` runs
(tests/test_flower_app.py checks that both give the same run, to the bit).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

# The same TinyLlama-1.1B shape, tiny shape and ranks as the other GPU check (this folder is on sys.path
# when a script of it runs).
from gpu_check import LLAMA_1B, LLAMA_TINY, RANKS

TINY = dict(LLAMA_TINY, vocab_size=LLAMA_1B["vocab_size"])  # room for the MiniLM tokenizer's 30,522 ids


def write_model(directory: Path, shape: dict, tokenizer: str = "default") -> Path:
    """A random-weight Llama-like causal LM and a tokenizer (the packaged MiniLM's, or the one in the
    directory `tokenizer`), saved as one model directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedsb.core.models import load_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    model.save_pretrained(directory)
    if tokenizer == "default":
        load_tokenizer("default").save_pretrained(directory)
    else:
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(directory)
    return directory


def run(job: str, model_dir: Path, out: Path, args: argparse.Namespace, dp: bool = False) -> dict:
    from fedsb.experiment.config import parse_override
    from fedsb.experiment.run_config import format_override_list
    from fedsb.experiment.summary import RunSummary, read_metrics
    from fedsb.federation.inprocess import run_in_process

    method, _, init = job.partition(":")
    overrides = {
        "model.name": str(model_dir), "model.task": "causal_lm", "model.max_length": 64,
        "data.source": "arithmetic", "data.num_examples": 1200, "data.max_val_examples": 64,
        "data.max_test_examples": 128, "partition.scheme": "iid",
        "federation.num_clients": args.clients, "federation.rounds": args.rounds,
        "train.local_steps": args.steps, "train.batch_size": args.batch, "train.lr": 1e-4,
        "method.name": method, "method.rank": 4 if args.tiny else RANKS[method],
        "method.init.num_samples": 32, "eval.batch_size": 64, "eval.max_new_tokens": 12,
    }
    if init:
        overrides["method.init.name"] = init
    overrides.update(dict(parse_override(item) for item in args.set))
    run_config = {"config": "configs/arithmetic.yaml", "run-dir": str(out),
                  "overrides": format_override_list(overrides)}
    if dp:
        run_config["privacy-epsilon"] = 8
    start = time.perf_counter()
    run_in_process(run_config)
    wall = time.perf_counter() - start
    rows, summary = read_metrics(out), RunSummary.read(out)
    rounds = [r for r in rows if r.round > 0]
    peaks = [r.gpu_peak_bytes for r in rows if r.gpu_peak_bytes is not None]
    return {"wall_s": wall, "round_s": (rounds[-1].wall_s - rows[0].wall_s) / len(rounds),
            "peak_gib": max(peaks) / 2**30 if peaks else float("nan"),
            "up": rounds[-1].bytes_up, "down": rounds[-1].bytes_down, "exact": summary.test_accuracy,
            "epsilon": summary.privacy.epsilon_max}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", default="fedit,ffa,fedex,fedsb")
    parser.add_argument("--tokenizer", default="default",
                        help="a tokenizer directory (default: the packaged MiniLM's)")
    parser.add_argument("--dp", action="store_true", help="also run the first method under DP-SGD")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. --set federation.client_ranks=4,8,16")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer model on any device: checks the script, measures nothing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        print("gpu_apps_check: no CUDA device on this machine; nothing to measure (run it on a GPU machine).")
        return 0
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (--tiny: no measurement)"
    print(f"gpu_apps_check: {device}; torch {torch.__version__}; {args.clients} virtual clients x "
          f"{args.rounds} rounds x {args.steps} steps, batch {args.batch}; the real ServerApp and ClientApp "
          f"in one process", flush=True)
    header = (f"{'method':<14} {'s/round':>8} {'GPU peak GiB':>12} {'up B/round':>12} {'down B/round':>13} "
              f"{'exact match':>11} {'epsilon':>8}")
    with tempfile.TemporaryDirectory(prefix="fedsb-gpu-") as tmp:
        model_dir = write_model(Path(tmp) / "llama", TINY if args.tiny else LLAMA_1B, args.tokenizer)
        print(header + "\n" + "-" * len(header), flush=True)
        methods = args.methods.split(",")
        jobs = [(m, False) for m in methods] + ([(methods[0], True)] if args.dp else [])
        for method, dp in jobs:
            r = run(method, model_dir, Path(tmp) / f"run-{method.replace(':', '-')}-{int(dp)}", args, dp)
            label = method + (" DP" if dp else "")
            print(f"{label:<14} {r['round_s']:>8.1f} {r['peak_gib']:>12.2f} {r['up']:>12,} {r['down']:>13,} "
                  f"{r['exact']:>11.3f} {r['epsilon'] or 0:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
