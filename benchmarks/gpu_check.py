"""GPU check: fedsb's federated client loop on a ~1B-parameter Llama-like model, on one CUDA GPU.

    python benchmarks/gpu_check.py [--clients 8] [--rounds 2] [--steps 4] [--batch 8] [--seq 256]

On a machine without CUDA it says so and exits 0 (`--tiny` runs the same loop on a 2-layer model
on whatever device there is: a check of the script, not a measurement). On a GPU it builds a
TinyLlama-1.1B-shaped model from its config with random weights (no download), the frozen base in
bfloat16 and the adapters, head, uploads and aggregation in float32 (`model.dtype: auto`), then
for each method:

- the federated loop: `--rounds` rounds in which each of `--clients` virtual clients loads the
  global state into the one shared model on the GPU, takes `--steps` AdamW steps with
  `fedsb.training.local.train_local`, uploads its trained tensors (moved to the CPU, as on the wire) and
  the server aggregates them with the method's rule (on the CPU, in float32/float64);
- a bare PyTorch loop of the same number of steps on the same model and adapters (forward,
  backward, AdamW step; no state loading, no upload, no aggregation), measured in the same run;

and prints, per method: ms per step and tokens/s of both loops and their ratio, the peak GPU
memory of the federated loop, and how many such processes (Flower's virtual-client actors, each
holding one base model) would fit on this GPU at that peak. The check runs the clients in one
process (a GPU machine without network access may lack Flower's Ray), so `--gpus-per-client`
itself is not exercised here.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

# The TinyLlama-1.1B shape (22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV heads).
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                pad_token_id=0)
LLAMA_TINY = dict(LLAMA_1B, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000)
METHODS = ("fedit", "ffa", "fedex", "fedsb")
RANKS = {"fedit": 16, "ffa": 16, "fedex": 16, "fedsb": 64, "bone": 16, "mora": 16}


def rank(name: str, args: argparse.Namespace) -> int:
    return 4 if args.tiny else RANKS[name]


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from fedsb.core.models import keep_heads_float32

    config = LlamaConfig(**shape, num_labels=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    keep_heads_float32(model)
    model.requires_grad_(False)
    return model.eval()


def random_batches(n: int, batch: int, seq: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 1000, (batch, seq), generator=g),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch,), generator=g)} for _ in range(n)]


def synchronised() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def run_method(name: str, model, args, device: torch.device) -> dict[str, float]:
    from fedsb.core.adapters import extract_state, load_state, set_trainable
    from fedsb.core.init import accumulate_gradients
    from fedsb.core.models import find_target_modules
    from fedsb.methods import build_method
    from fedsb.training.local import make_optimizer, to_device, train_local

    method = build_method(name, model, find_target_modules(model), rank(name, args), float(rank(name, args)))
    gradients = None
    if method.init_gradients:  # e.g. the LoRA-SB init, from 16 examples' gradient at the base model
        gradients = accumulate_gradients(model, list(method.specs), random_batches(2, 8, args.seq, 99), 16)
    steps_total = args.clients * args.rounds * args.steps
    lr_eff = 1e-4 / (args.rounds * args.steps)
    state = method.initial_state(model, torch.Generator().manual_seed(0), gradients, lr_eff=lr_eff)
    state = {k: v.cpu() for k, v in state.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # The federated loop: every client shares the one model on the GPU.
    start = synchronised()
    for server_round in range(args.rounds):
        uploads = []
        for client in range(args.clients):
            load_state(model, state)
            batches = random_batches(args.steps, args.batch, args.seq, seed=1000 * server_round + client)
            train_local(model, method, batches, args.steps, lr=1e-4)
            upload = method.upload(extract_state(model, method.trained))
            uploads.append({k: v.cpu() for k, v in upload.items()})
        state = method.aggregate(state, uploads, [1.0] * len(uploads))
    federated_s = synchronised() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    assert all(torch.isfinite(v).all() for v in state.values()), "the aggregate is not finite"

    # The bare loop: the same steps on the same adapters, nothing federated around them.
    load_state(model, state)
    params = set_trainable(model, method.trained)
    optimizer = make_optimizer(params, "adamw", 1e-4)
    model.train()
    batches = random_batches(steps_total, args.batch, args.seq, seed=7)
    start = synchronised()
    for batch in batches:
        loss = model(**to_device(batch, device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    bare_s = synchronised() - start
    model.eval()
    model.requires_grad_(False)

    unwrap(model)
    tokens = steps_total * args.batch * args.seq
    return {"federated_ms": 1000 * federated_s / steps_total, "bare_ms": 1000 * bare_s / steps_total,
            "federated_tok_s": tokens / federated_s, "bare_tok_s": tokens / bare_s, "peak_bytes": peak,
            "trained": sum(v.numel() for v in method.upload(state).values())}


def unwrap(model) -> None:
    """Take the adapters out again, so the next method starts from the bare base model."""
    from fedsb.core.adapters import adapter_layers

    for name, layer in adapter_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer model at rank 4 on any device: checks the script, measures nothing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        print("gpu_check: no CUDA device on this machine; nothing to measure (run it on a GPU machine).")
        return 0
    from fedsb.core.models import resolve_device, resolve_dtype

    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        name, total = properties.name, properties.total_memory
    else:
        name, total = "CPU (--tiny: no measurement)", 0
    print(f"gpu_check: {name}, {total / 2**30:.1f} GiB; torch {torch.__version__}; base dtype "
          f"{str(dtype).removeprefix('torch.')}, adapters float32", flush=True)
    model = build_model(LLAMA_TINY if args.tiny else LLAMA_1B, device, dtype)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: Llama-like, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
          f"{base_bytes / 2**30:.2f} GiB of weights; {args.clients} virtual clients x {args.rounds} rounds x "
          f"{args.steps} steps, batch {args.batch} x {args.seq} tokens", flush=True)
    header = (f"{'method':<6} {'rank':>4} {'trained':>12} | {'ms/step fed':>11} {'bare':>7} {'ratio':>6} | "
              f"{'tok/s fed':>10} {'bare':>8} | {'peak GiB':>8} {'actors/GPU':>10}")
    print(header)
    print("-" * len(header))
    for name in args.methods.split(","):
        r = run_method(name, model, args, device)
        # 5% kept back for the CUDA context and fragmentation
        actors = math.floor(total * 0.95 / r["peak_bytes"]) if r["peak_bytes"] else 0
        print(f"{name:<6} {rank(name, args):>4} {r['trained']:>12,} | {r['federated_ms']:>11.1f} "
              f"{r['bare_ms']:>7.1f} {r['federated_ms'] / r['bare_ms']:>5.2f}x | "
              f"{r['federated_tok_s']:>10,.0f} {r['bare_tok_s']:>8,.0f} | {r['peak_bytes'] / 2**30:>8.2f} "
              f"{actors:>10}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
