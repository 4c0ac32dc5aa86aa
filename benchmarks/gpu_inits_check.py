"""GPU check of the weight-based inits: OLoRA and PiSSA computed on the GPU equal the CPU's.

    python benchmarks/gpu_inits_check.py [--rank 16] [--tiny]

OLoRA and PiSSA are computed by every process from the pretrained weights it holds (no bytes sent),
so a server on one device and clients on another must get the same tensors. On a CUDA GPU this
builds the TinyLlama-1.1B-shaped layer 0 (random bfloat16 weights, no download; `--tiny` uses the
2-layer shape on the CPU twice: a check of the script), computes both inits for its seven target
modules on the CPU and on the GPU, and prints, per init, the largest relative difference of the
factors B and A and of the initial product B A (the base offset every process subtracts).
"""

from __future__ import annotations

import argparse
import sys

import torch
from gpu_check import LLAMA_1B, LLAMA_TINY

from fedsb.core.init import olora_init, pissa_init


def layer_weights(shape: dict) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(0)
    layer = LlamaDecoderLayer(LlamaConfig(**shape), layer_idx=0).to(torch.bfloat16)
    return {name.removesuffix(".weight"): p.detach().float() for name, p in layer.named_parameters()
            if name.endswith("proj.weight")}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def product(state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    return state[f"{module}.lora_B"].double() @ state[f"{module}.lora_A"].double()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="the 2-layer shape, CPU against CPU")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        print("gpu_inits_check: no CUDA device on this machine; nothing to measure (run it on a GPU "
              "machine).")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights = layer_weights(LLAMA_TINY if args.tiny else LLAMA_1B)
    rank = min(args.rank, *(min(w.shape) for w in weights.values()))
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"gpu_inits_check: {where}; torch {torch.__version__}; {len(weights)} modules of layer 0 "
          f"({', '.join(sorted(weights))}), rank {rank}")
    inits = {
        "olora": lambda w: olora_init(w, rank),
        "pissa": lambda w: pissa_init(w, rank, 1.0, torch.Generator().manual_seed(0)),
    }
    for name, init in inits.items():
        cpu = init(weights)
        gpu = {k: v.cpu() for k, v in init({n: w.to(device) for n, w in weights.items()}).items()}
        factors = max(relative(gpu[k], cpu[k]) for k in cpu)
        products = max(relative(product(gpu, m), product(cpu, m)) for m in weights)
        print(f"{name}: largest relative difference GPU vs CPU: factors {factors:.2e}, "
              f"product B A {products:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
