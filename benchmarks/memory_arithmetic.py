"""The GPU memory one Flower client actor needs, before activations: counted, not measured.

    python benchmarks/memory_arithmetic.py [--lora-rank 32] [--fedsb-rank 200]

For each shipped architecture config (built on PyTorch's meta device: no weights, no download) it
prints the base weights in bfloat16, the parameters LoRA trains at `--lora-rank` on the default
targets (q,k,v,o,gate,up,down) with their float32 weight, gradient and AdamW state (16 bytes each),
and Fed-SB's frozen float32 B and A at `--fedsb-rank` with its trained R's state. The memory
table of docs/gpus.md ("N clients on one GPU") comes from this script.
"""

from __future__ import annotations

import argparse
import math
import sys

from fedsb.experiment.comm import accounting_model, method_for_model

MODELS = ("tinyllama-1.1b", "llama-3.2-3b", "mistral-7b-v0.1")


def shapes_numel(method, components: tuple[str, ...]) -> int:
    return sum(math.prod(s) for s in method.component_shapes(components).values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--fedsb-rank", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"{'model':<18} {'params':>8} {'bf16 weights':>12} | {'LoRA r=' + str(args.lora_rank):>14} "
          f"{'state GB':>8} | {'Fed-SB B,A GB':>13} {'R state GB':>10}")
    for name in MODELS:
        model = accounting_model(name, "causal_lm").model
        params = sum(p.numel() for p in model.parameters())
        lora = method_for_model(model, "fedit", args.lora_rank)
        fedsb = method_for_model(model, "fedsb", args.fedsb_rank)
        lora_trained = shapes_numel(lora, lora.trainable)
        frozen = shapes_numel(fedsb, fedsb.one_time)
        r_trained = shapes_numel(fedsb, fedsb.trainable)
        print(f"{name:<18} {params / 1e9:>7.2f}B {2 * params / 1e9:>9.1f} GB | {lora_trained / 1e6:>13.1f}M "
              f"{16 * lora_trained / 1e9:>8.2f} | {4 * frozen / 1e9:>13.2f} {16 * r_trained / 1e9:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
