"""Per-example losses and their per-sample gradients, by Opacus hooks on a shared model.

`per_example_loss` gives one loss per example (no example's gradient depends on another's);
`grad_sample_hooks` attaches Opacus's `GradSampleHooks` to the model in place for one call and
leaves no trace of Opacus afterwards (the model is shared by many virtual clients of one process
and never copied); `per_sample_gradients` puts the two together. A grad-sampler rule for
transformers' Conv1D (GPT-2), and one for Bone's per-block-row maps, are registered with Opacus on
import (MoRA's M is an nn.Linear: Opacus's own rule).

Opacus internals: the cleanup deletes the attributes Opacus's hooks leave on parameters and
modules (`grad_sample`, `summed_grad`, `activations`, `max_batch_len`), and the Conv1D and
BlockLinear rules are registered only if `GradSampleHooks.GRAD_SAMPLERS` lacks them. Hence the upper
bound on opacus in pyproject.toml.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleHooks, register_grad_sampler
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.core.adapters import set_trainable
from fedsb.core.block_adapters import BlockLinear
from fedsb.methods.base import FederatedMethod

Batch = Mapping[str, torch.Tensor]


# --- Opacus: a per-sample gradient rule for transformers' Conv1D (GPT-2) ------------------------

# Opacus internal: its registry of grad samplers (opacus is bounded in pyproject.toml for this).
if Conv1D not in GradSampleHooks.GRAD_SAMPLERS:
    # Conv1D is y = x W + b with W stored (in, out). Without a rule Opacus would fall back to
    # functorch, which deep-copies the layer; this is the nn.Linear rule in Conv1D's layout.
    @register_grad_sampler(Conv1D)
    def _conv1d_grad_sample(layer: Conv1D, activations: list[torch.Tensor], backprops: torch.Tensor
                            ) -> dict[nn.Parameter, torch.Tensor]:
        x = activations[0].to(backprops.dtype)
        out: dict[nn.Parameter, torch.Tensor] = {}
        if layer.weight.requires_grad:
            out[layer.weight] = torch.einsum("n...i,n...j->nij", x, backprops)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = torch.einsum("n...k->nk", backprops)
        return out


# Bone's blocks (fedsb.core.block_adapters.BlockLinear): z[..., a, j, :] = B_a x_j, so the gradient of
# B_a sums backprop_{a,j} x_j^T over chunks j and positions. Without a rule Opacus would fall back to
# functorch (a deep copy of the layer per call).
if BlockLinear not in GradSampleHooks.GRAD_SAMPLERS:
    @register_grad_sampler(BlockLinear)
    def _block_linear_grad_sample(layer: BlockLinear, activations: list[torch.Tensor], backprops: torch.Tensor
                                  ) -> dict[nn.Parameter, torch.Tensor]:
        chunks = activations[0].to(backprops.dtype)  # (B, ..., J, b)
        return {layer.weight: torch.einsum("n...ajk,n...jl->nakl", backprops, chunks)}


# --- per-example losses --------------------------------------------------------------------------

def per_example_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """One loss per example, shape (B,), so that no example's gradient depends on another's.

    Sequence classification: cross-entropy (MSE when num_labels == 1), as HF computes it but
    unreduced. Causal LM: each sequence's mean token loss over its own non-ignored next tokens
    (HF's built-in loss averages tokens over the whole batch, which couples the examples).
    Token labels are `labels` (B, L) with -100 ignored, or, without labels, the input ids
    with padding ignored.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    labels = batch.get("labels")
    if logits.dim() == 2:  # sequence classification
        if labels is None:
            raise ValueError("a classification batch needs 'labels'")
        if logits.shape[-1] == 1:  # HF's regression problem type
            return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
        return F.cross_entropy(logits, labels, reduction="none")
    if labels is None:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    if labels.dim() != 2:
        raise ValueError(f"a causal LM batch needs token labels of shape (B, L), got {tuple(labels.shape)}")
    target = labels[:, 1:]
    tokens = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100,
                             reduction="none").view_as(target)
    mask = (target != -100).to(tokens.dtype)
    return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)


# --- per-sample gradients on a shared model ------------------------------------------------------

def _cleanup(model: nn.Module, hooks: GradSampleHooks, params: list[nn.Parameter]) -> None:
    """Leave no trace of Opacus on the shared model: hooks, per-sample buffers, activations."""
    # Opacus internals: the attribute names its hooks set (opacus is bounded in pyproject.toml for this).
    hooks.cleanup()  # removes the hooks and grad_sample/_forward_counter/... from the parameters
    for p in params:
        for attr in ("summed_grad", "grad_sample"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
    for module in model.modules():
        for attr in ("activations", "max_batch_len"):
            if attr in module.__dict__:
                delattr(module, attr)


@contextlib.contextmanager
def grad_sample_hooks(model: nn.Module, params: list[nn.Parameter]) -> Iterator[GradSampleHooks]:
    """Opacus's per-sample gradient hooks on `model` for the duration of a `with` block.

    Inside, a backward pass of the *sum* of per-example losses fills `p.grad_sample` (B, *shape)
    for each of `params` (which must be exactly the model's trainable parameters). On exit the
    hooks and every attribute Opacus left on the model are removed, and the params' grads cleared.
    """
    # GradSampleHooks attaches to the model in place (no wrapper module), on exactly the modules
    # owning a trainable parameter; "sum": we backpropagate the sum of per-example losses.
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        with warnings.catch_warnings():
            # Expected for hooked layers whose inputs need no gradient (the first adapters, the
            # head): the hook then sees only output gradients, which is all Opacus uses.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield hooks
    finally:
        _cleanup(model, hooks, params)


def per_sample_gradients(model: nn.Module, method: FederatedMethod, batch: Batch) -> dict[str, torch.Tensor]:
    """Per-example gradients (B, *shape) of every tensor the method trains, by parameter name.

    Computed by Opacus's hooks on `per_example_loss`; the model is left as it was found
    (frozen, no hooks). Runs in train mode (Opacus records activations only then).
    """
    params = set_trainable(model, method.trained)
    names = {id(p): name for name, p in model.named_parameters()}
    was_training = model.training
    model.train()
    try:
        with grad_sample_hooks(model, params):
            per_example_loss(model, batch).sum().backward()
            return {names[id(p)]: p.grad_sample.detach().clone() for p in params}
    finally:
        model.train(was_training)
        model.requires_grad_(False)
