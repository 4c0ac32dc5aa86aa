"""Local training and evaluation loops (plain PyTorch; no Flower)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedsb.core.adapters import set_trainable
from fedsb.methods.base import FederatedMethod

Batch = Mapping[str, torch.Tensor]
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainResult:
    loss: float  # mean training loss over the steps taken
    steps: int
    examples: int


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on the model's device (batches are built on the CPU; a no-op there)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_optimizer(params: list[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0
                   ) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}")


def cycle(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Repeat an iterable of batches forever (a new pass each time it runs out)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("no training batches: the client's data is empty")


def train_local(
    model: nn.Module, method: FederatedMethod, batches: Iterable[Batch], steps: int,
    lr: float, optimizer: str = "adamw", max_grad_norm: float | None = None,
    before_step: Callable[[], None] | None = None,
) -> TrainResult:
    """Take `steps` optimiser steps on the tensors the method trains; everything else stays frozen.

    The optimiser is created afresh each round (its state is not part of the federated state).
    `before_step` runs before each step (nested-rank training samples the step's rank there).
    """
    params = set_trainable(model, method.trained)
    opt = make_optimizer(params, optimizer, lr)
    device = model_device(model)
    model.train()
    total_loss, examples = 0.0, 0
    source = cycle(batches)
    for _ in range(steps):
        if before_step is not None:
            before_step()
        batch = to_device(next(source), device)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        total_loss += loss.item()
        examples += len(batch["labels"])
    model.eval()
    model.requires_grad_(False)
    return TrainResult(total_loss / max(steps, 1), steps, examples)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
    """Mean loss and accuracy (classification: argmax of logits; causal LM: next-token)."""
    model.eval()
    device = model_device(model)
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = to_device(batch, device)
        out = model(**batch)
        labels = batch["labels"]
        if out.logits.dim() == 2:  # sequence classification
            predictions = out.logits.argmax(-1)
            correct += int((predictions == labels).sum())
            n = len(labels)
        else:  # causal LM: accuracy over non-padding next tokens
            predictions = out.logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            mask = target != -100
            correct += int(((predictions == target) & mask).sum())
            n = int(mask.sum())
        loss_sum += out.loss.item() * n
        count += n
    if count == 0:
        return {"loss": math.nan, "accuracy": math.nan, "examples": 0}
    return {"loss": loss_sum / count, "accuracy": correct / count, "examples": count}
