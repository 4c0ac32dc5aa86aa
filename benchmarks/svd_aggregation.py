"""The `svd` rank aggregation (FlexLoRA) at a large model's shapes: the full SVD of the averaged
product against the SVD through the stacked client factors (`fedsb.methods.ranks.svd_factors_of_sum`),
measured in the same run on the same factors.

    python benchmarks/svd_aggregation.py [--ranks 4,8,16,16] [--global-rank 16]

Shapes are one layer of a 1.1B Llama (TinyLlama: hidden 2048, MLP 5632, 4 key-value heads of 64);
the per-round figure multiplies by its 22 layers. Prints each module's time both ways and the largest
difference between the two rank-r products.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedsb.methods.ranks import svd_factors, svd_factors_of_sum  # noqa: E402

LAYER = {"q_proj": (2048, 2048), "k_proj": (256, 2048), "v_proj": (256, 2048), "o_proj": (2048, 2048),
         "gate_proj": (5632, 2048), "up_proj": (5632, 2048), "down_proj": (2048, 5632)}  # out x in
LAYERS = 22


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="4,8,16,16", help="the cohort's client ranks")
    parser.add_argument("--global-rank", type=int, default=16)
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    weights = [1.0 / len(ranks)] * len(ranks)
    generator = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} threads; client ranks {ranks}, global rank {args.global_rank}")
    totals = [0.0, 0.0]
    for name, (m, n) in LAYER.items():
        bs = [torch.randn(m, r, generator=generator) * 0.01 for r in ranks]
        as_ = [torch.randn(r, n, generator=generator) for r in ranks]
        start = time.perf_counter()
        product = sum(w * (b.double() @ a.double()) for b, a, w in zip(bs, as_, weights, strict=True))
        full_b, full_a = svd_factors(product, args.global_rank)
        full_s = time.perf_counter() - start
        start = time.perf_counter()
        b, a = svd_factors_of_sum(bs, as_, weights, args.global_rank)
        stacked_s = time.perf_counter() - start
        difference = float((b @ a - full_b @ full_a).abs().max() / (full_b @ full_a).abs().max())
        totals[0] += full_s
        totals[1] += stacked_s
        print(f"{name:>9} {m:5d} x {n:5d}: full SVD {full_s:7.3f} s, stacked factors {stacked_s:6.3f} s, "
              f"relative difference of the products {difference:.1e}")
    print(f"a round ({LAYERS} layers): full SVD {LAYERS * totals[0]:.1f} s, stacked factors "
          f"{LAYERS * totals[1]:.1f} s ({totals[0] / totals[1]:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
