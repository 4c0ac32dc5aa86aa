"""Fed-SB's init gradient under DP: a client's LoRA-SB init gradient, clipped, noised and charged.

With `method.init.source=clients`, each client sends the summed gradient of its loss w.r.t.
every target base weight; `privatize_init_gradient` makes that one Poisson-subsampled Gaussian
mechanism, the one `PrivacyLedger.record_init` charges and `calibrate_noise` planned for.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.core.adapters import AdapterLayer
from fedsb.training.privacy.accounting import PrivacyLedger
from fedsb.training.privacy.dpsgd import seeded_generator
from fedsb.training.privacy.per_sample import grad_sample_hooks, per_example_loss

# The private init materialises per-sample gradients of whole base weights (in x out each):
# a few examples at a time keeps that memory bounded (MiniLM: ~42 MB per example).
INIT_MICRO_BATCH = 4


def privatize_init_gradient(
    model: nn.Module, targets: list[str], dataset: Mapping[str, torch.Tensor], num_samples: int,
    ledger: PrivacyLedger, *, seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """A client's LoRA-SB init gradient under DP, charged to its ledger; out x in per module.

    Mechanism: a Poisson sample of the client's examples (rate q0 = min(1, num_samples / n),
    the ledger's init_sample_rate); each example's gradient of its loss w.r.t. every target
    base weight, flattened over all targets, clipped to norm max_grad_norm; the clipped
    gradients summed; Gaussian noise of std init_noise_multiplier * max_grad_norm added to
    every coordinate. Under add/remove-one adjacency the sum has L2 sensitivity max_grad_norm,
    so this is one Poisson-subsampled Gaussian mechanism (init_noise_multiplier, q0): exactly
    what `PrivacyLedger.record_init` charges (and what `calibrate_noise` planned for). Like
    `fedsb.core.init.accumulate_gradients`, the model runs without dropout; adapters are as loaded.
    """
    sigma, q0 = ledger.init_noise_multiplier, ledger.init_sample_rate
    if sigma is None or q0 is None:
        raise ValueError("this client's ledger was calibrated without a private init (ledger_for_client "
                         "plans one when method.init.source=clients)")
    n = len(dataset["input_ids"])
    if n != ledger.num_examples:
        raise ValueError(f"the ledger was calibrated for {ledger.num_examples} examples, the data has {n}")
    if abs(q0 - min(1.0, num_samples / n)) > 1e-12:
        raise ValueError(f"the ledger planned an init sample rate {q0}, not min(1, {num_samples}/{n})")
    if ledger.init_charged:
        raise ValueError("this client's private init was already charged")
    layers: dict[str, nn.Module] = {}
    for name in targets:
        module = model.get_submodule(name)
        layers[name] = module.base if isinstance(module, AdapterLayer) else module
    was_training = model.training
    model.requires_grad_(False)
    model.eval()  # no dropout, as in accumulate_gradients ...
    weights = [layer.weight for layer in layers.values()]
    for layer in layers.values():
        layer.weight.requires_grad_(True)
        layer.train()  # ... but Opacus records activations only in modules in training mode
    indices = next(iter(UniformWithReplacementSampler(num_samples=n, sample_rate=q0,
                                                      generator=seeded_generator(seed, 3), steps=1)))
    sums = {name: torch.zeros_like(layer.weight) for name, layer in layers.items()}
    # The mechanism is charged before it runs, so a failure can never release an uncharged result.
    ledger.record_init()
    try:
        with grad_sample_hooks(model, weights):
            for start in range(0, len(indices), INIT_MICRO_BATCH):
                index = torch.as_tensor(indices[start:start + INIT_MICRO_BATCH], dtype=torch.long,
                                        device=dataset["input_ids"].device)
                batch = {k: v[index] for k, v in dataset.items()}
                per_example_loss(model, batch).sum().backward()
                grads = {name: layer.weight.grad_sample for name, layer in layers.items()}
                norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)
                factor = (ledger.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus's clip rule
                for name, g in grads.items():
                    sums[name] += torch.einsum("i,i...->...", factor, g)
                for w in weights:
                    w.grad_sample, w.grad = None, None
    finally:
        model.requires_grad_(False)
        model.train(was_training)
    # One generator for every module: the noise must be independent across all coordinates.
    generator = seeded_generator(seed, 4, next(iter(sums.values())).device)
    out = {}
    for name, layer in layers.items():
        noisy = sums[name] + torch.normal(0.0, sigma * ledger.max_grad_norm, size=sums[name].shape,
                                          generator=generator, dtype=sums[name].dtype,
                                          device=sums[name].device)
        out[name] = (noisy.T if isinstance(layer, Conv1D) else noisy).contiguous()
    return out
