"""Adapter initialisations, one function each: LoRA's Kaiming (and FFA-LoRA's shared seed), OLoRA,
PiSSA, LoRA-GA, LoRA-SB, and the block adapters' zeros (Bone, MoRA); `adapter_init` computes the one
a config names.

What each init is computed from and costs is declared in `fedsb.core.init_choices`. The inits
computed from matrices (weights or gradients) factor them in float64 and fix the sign of each
singular pair (or QR column), so that processes holding the same matrix compute the same float32
tensors whatever sign LAPACK picks. Every function draws from an explicit torch.Generator and never
touches (or reseeds) the global random generator, so initialising adapters leaves the caller's random
state intact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.core.adapters import AdapterLayer, ModuleSpec, State, adapter_layer_class, key
from fedsb.core.init_choices import InitChoice

# Above this size (min(m, n)) the truncated SVD is computed by a randomized range finder.
RANDOMIZED_SVD_MIN_DIM = 1024
# LoRA-GA's stable scale: B0 and A0 are its orthonormal singular vectors times m^(1/4) / sqrt(gamma),
# gamma = 16 as in the authors' code and PEFT's LoraGAConfig.
LORA_GA_GAMMA = 16.0


def lora_init(specs: Mapping[str, ModuleSpec], rank: int, generator: torch.Generator) -> State:
    """LoRA's init: A ~ Kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(n), 1/sqrt(n))), B = 0."""
    state: State = {}
    for name, spec in specs.items():
        bound = 1.0 / math.sqrt(spec.in_features)
        a = torch.rand(rank, spec.in_features, generator=generator) * (2 * bound) - bound
        state[key(name, "lora_A")] = a
        state[key(name, "lora_B")] = torch.zeros(spec.out_features, rank)
    return state


def zeros_init(specs: Mapping[str, ModuleSpec], rank: int, kind: str) -> State:
    """Every component of a block adapter (Bone, MoRA) at zero, as their papers: dW = 0 at step 0."""
    layer = adapter_layer_class(kind)
    return {key(name, c): torch.zeros(shape) for name, spec in specs.items()
            for c, shape in layer.shapes(spec, rank).items()}


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


def _fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair (u_i, v_i) so that the largest-magnitude entry of u_i is positive.

    An SVD's pairs are defined up to a common sign; fixing it makes the factors a function of the
    matrix alone, not of the LAPACK build or thread count that computed them."""
    signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True))).squeeze(0)
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


def olora_init(weights: Mapping[str, torch.Tensor], rank: int) -> State:
    """OLoRA: W0 = Q R (QR decomposition, out x in); B = Q_r (orthonormal columns), A = R_r.

    Q_r and R_r depend only on W0's first r columns: Q_r R_rr is their QR (sign fixed so that
    diag(R_rr) >= 0, which makes it unique), and R_r = Q_r^T W0. That is the full QR's first r
    columns and rows, at O(r m n) instead of O(m n min(m, n)). The adapter's initial product
    s B A is taken out of the frozen weight (InitChoice.offsets_base).
    """
    state: State = {}
    for name, weight in weights.items():
        m, n = weight.shape
        if rank > min(m, n):
            raise ValueError(f"rank {rank} exceeds the module's smallest dimension {min(m, n)}")
        w = weight.double()
        q, r = torch.linalg.qr(w[:, :rank])
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1
        q = q * signs
        state[key(name, "lora_B")] = q.float().contiguous()
        state[key(name, "lora_A")] = (q.T @ w).float().contiguous()
    return state


def pissa_init(weights: Mapping[str, torch.Tensor], rank: int, scale: float, generator: torch.Generator,
               randomized: bool | None = None) -> State:
    """PiSSA: the principal rank-r part of W0 = U S V^T; B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T,
    so that s B A is W0's best rank-r approximation (and is taken out of the frozen weight).
    Randomized SVD for large modules (see truncated_svd)."""
    state: State = {}
    for name, weight in weights.items():
        u, s, vh = truncated_svd(weight, rank, generator, randomized)
        u, vh = _fix_signs(u, vh)
        root = torch.sqrt(s / scale)
        state[key(name, "lora_B")] = (u * root).contiguous()
        state[key(name, "lora_A")] = (root[:, None] * vh).contiguous()
    return state


def lora_ga_init(gradients: Mapping[str, torch.Tensor], rank: int, generator: torch.Generator,
                 gamma: float = LORA_GA_GAMMA, randomized: bool | None = None) -> State:
    """LoRA-GA, the authors' recipe (their default direction 'ArB2r' and 'stable' scale): with the
    accumulated gradient's SVD G = U S V^T (out x in), A = V_{1..r}^T and B = U_{r+1..2r}, both times
    m^(1/4) / sqrt(gamma) (m = out features). Then the first step of A and B moves s B A along G's
    best rank-2r approximation. Only G's singular vectors are used, so the init does not depend on
    G's scale (a sum or a mean over examples or clients). PEFT 0.21 also multiplies B by
    S_{r+1..2r}; fedsb does not (tests/test_inits.py states the difference).
    """
    state: State = {}
    for name, gradient in gradients.items():
        u, _, vh = truncated_svd(gradient, 2 * rank, generator, randomized)
        u, vh = _fix_signs(u, vh)
        factor = gradient.shape[0] ** 0.25 / math.sqrt(gamma)
        state[key(name, "lora_A")] = (vh[:rank] * factor).contiguous()
        state[key(name, "lora_B")] = (u[:, rank:2 * rank] * factor).contiguous()
    return state


@dataclass(frozen=True)
class InitInputs:
    """What an init may be computed from; each init takes what its declaration says it needs."""

    specs: Mapping[str, ModuleSpec]
    rank: int
    scale: float
    generator: torch.Generator
    weights: Mapping[str, torch.Tensor] | None = None  # the pretrained W0 per module, out x in
    gradients: Mapping[str, torch.Tensor] | None = None  # the accumulated loss gradient, out x in
    lr_eff: float | None = None  # LoRA-SB's first-update learning rate

    def need(self, what: str, init: str) -> Mapping[str, torch.Tensor]:
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"the {init} init needs the target modules' {what}"
                             + (" (see fedsb.core.init.accumulate_gradients)" if what == "gradients" else ""))
        return value


def _lora_sb(inputs: InitInputs) -> State:
    if inputs.lr_eff is None:
        raise ValueError("the lora_sb init needs lr_eff, the first-update estimate's learning rate "
                         "(the config's init_lr: train.lr / a client's steps in the run)")
    return lora_sb_init(inputs.need("gradients", "lora_sb"), inputs.rank, inputs.scale, inputs.lr_eff,
                        inputs.generator)


_BUILDERS: dict[str, Callable[[InitInputs], State]] = {
    "kaiming": lambda i: lora_init(i.specs, i.rank, i.generator),
    "olora": lambda i: olora_init(i.need("weights", "olora"), i.rank),
    "pissa": lambda i: pissa_init(i.need("weights", "pissa"), i.rank, i.scale, i.generator),
    "lora_ga": lambda i: lora_ga_init(i.need("gradients", "lora_ga"), i.rank, i.generator),
    "lora_sb": _lora_sb,
    "bone_zeros": lambda i: zeros_init(i.specs, i.rank, "bone"),
    "mora_zeros": lambda i: zeros_init(i.specs, i.rank, "mora"),
}


def adapter_init(choice: InitChoice, inputs: InitInputs) -> State:
    """The initial adapter tensors (lora_A, lora_B; LoRA-SB's lora_R) of the chosen init."""
    if choice.name not in _BUILDERS:
        raise ValueError(f"no init function for {choice.name!r}; known: {', '.join(_BUILDERS)}")
    return _BUILDERS[choice.name](inputs)
