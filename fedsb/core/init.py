"""Adapter initialisations: LoRA, FFA-LoRA, and LoRA-SB's gradient-approximation init.

Every function draws from an explicit torch.Generator and never touches (or reseeds) the
global random generator, so initialising adapters leaves the caller's random state intact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.core.adapters import AdapterLayer, ModuleSpec, State, key

# Above this size (min(m, n)) the truncated SVD is computed by a randomized range finder.
RANDOMIZED_SVD_MIN_DIM = 1024


def lora_init(specs: Mapping[str, ModuleSpec], rank: int, generator: torch.Generator) -> State:
    """LoRA's init: A ~ Kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(n), 1/sqrt(n))), B = 0."""
    state: State = {}
    for name, spec in specs.items():
        bound = 1.0 / math.sqrt(spec.in_features)
        a = torch.rand(rank, spec.in_features, generator=generator) * (2 * bound) - bound
        state[key(name, "lora_A")] = a
        state[key(name, "lora_B")] = torch.zeros(spec.out_features, rank)
    return state


def ffa_init(specs: Mapping[str, ModuleSpec], rank: int, seed: int) -> State:
    """FFA-LoRA's init: LoRA's, with A drawn from a seed that every client shares (A stays frozen)."""
    return lora_init(specs, rank, torch.Generator().manual_seed(seed))


def accumulate_gradients(
    model: nn.Module, targets: Iterable[str], batches: Iterable[Mapping[str, torch.Tensor]],
    num_samples: int,
) -> dict[str, torch.Tensor]:
    """Sum over `num_samples` examples of the loss gradient w.r.t. each target base weight.

    Each batch is a dict of model inputs including `labels`; the model's loss is a batch mean,
    so it is multiplied by the batch size to give a per-sample sum. The model runs in eval
    mode (no dropout) so the result is deterministic. Returns gradients out x in.
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    weights = {}
    for name in targets:
        module = model.get_submodule(name)
        layer = module.base if isinstance(module, AdapterLayer) else module
        weights[name] = (layer.weight, isinstance(layer, Conv1D))
    was_training = model.training
    model.eval()
    for weight, _ in weights.values():
        weight.requires_grad_(True)
        weight.grad = None
    seen = 0
    device = next(iter(weights.values()))[0].device
    try:
        for batch in batches:
            take = min(len(batch["labels"]), num_samples - seen)
            if take <= 0:
                break
            inputs = {k: v[:take].to(device) for k, v in batch.items()}
            (model(**inputs).loss * take).backward()
            seen += take
    finally:
        grads = {}
        for name, (weight, conv1d) in weights.items():
            grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
            grads[name] = (grad.T if conv1d else grad).detach().float()  # float32 over any base dtype
            weight.grad = None
            weight.requires_grad_(False)
        model.train(was_training)
    if seen == 0:
        raise ValueError("no examples to estimate the LoRA-SB init gradient from")
    return grads


def first_update_estimate(gradient: torch.Tensor, lr_eff: float) -> torch.Tensor:
    """Adam's first step from a zero state: m / sqrt(v) = sign(g), so the update is -lr * sign(g)."""
    return -lr_eff * torch.sign(gradient)


def truncated_svd(
    matrix: torch.Tensor, rank: int, generator: torch.Generator, randomized: bool | None = None,
    oversample: int = 10, power_iterations: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r SVD: U (m x r), S (r), Vh (r x n). Randomized (Halko et al.) for large matrices."""
    m, n = matrix.shape
    if rank > min(m, n):
        raise ValueError(f"rank {rank} exceeds the module's smallest dimension {min(m, n)}")
    if randomized is None:
        randomized = min(m, n) >= RANDOMIZED_SVD_MIN_DIM
    matrix = matrix.double()
    if not randomized:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        sketch = min(rank + oversample, min(m, n))
        # Drawn on the CPU generator (the same sketch on any device), then moved to the matrix.
        omega = torch.randn(n, sketch, generator=generator, dtype=matrix.dtype).to(matrix.device)
        q, _ = torch.linalg.qr(matrix @ omega)
        for _ in range(power_iterations):
            q, _ = torch.linalg.qr(matrix.T @ q)
            q, _ = torch.linalg.qr(matrix @ q)
        u_small, s, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
        u = q @ u_small
    return u[:, :rank].float(), s[:rank].float(), vh[:rank].float()


def lora_sb_init(
    gradients: Mapping[str, torch.Tensor], rank: int, scale: float, lr_eff: float,
    generator: torch.Generator, randomized: bool | None = None,
) -> State:
    """LoRA-SB's init from accumulated gradients (out x in per module).

    The first update is approximated as dW = -lr_eff * sign(G); with its rank-r SVD U S V^T,
    B = U_r and A = V_r^T (orthonormal, frozen) and R0 = S_r / scale, so that the adapter's
    initial contribution scale * B R0 A is the best rank-r approximation of dW.
    """
    state: State = {}
    for name, gradient in gradients.items():
        u, s, vh = truncated_svd(first_update_estimate(gradient, lr_eff), rank, generator, randomized)
        state[key(name, "lora_B")] = u.contiguous()
        state[key(name, "lora_R")] = torch.diag(s / scale)
        state[key(name, "lora_A")] = vh.contiguous()
    return state
