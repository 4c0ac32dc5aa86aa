"""DP-SGD on a shared model: the private optimiser step and a client's private local round.

`PrivateStepper` takes DP-SGD steps for the duration of a `with` block: per-sample gradients
by Opacus's hooks (`per_sample`), clipping and Gaussian noise by Opacus's `DPOptimizer`.
`train_local_private` runs a client's round of Poisson-sampled steps with the noise multiplier,
clipping norm and sample rate of its `PrivacyLedger`, and charges every step to it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping

import torch
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from fedsb.core.adapters import set_trainable
from fedsb.methods.base import FederatedMethod
from fedsb.training.local import TrainResult, make_optimizer
from fedsb.training.privacy.accounting import BudgetExceeded, PrivacyLedger
from fedsb.training.privacy.per_sample import Batch, grad_sample_hooks, per_example_loss


class PrivateStepper:
    """DP-SGD on a shared model for the duration of a `with` block (Opacus hooks + DPOptimizer).

    Inside the block `step(batch)` takes one DP-SGD step: per-example losses, per-sample
    gradients of exactly `method.trained`, clipping to `max_grad_norm` over all of them
    jointly, Gaussian noise of std noise_multiplier * max_grad_norm on the sum, division by
    the *expected* batch size (Poisson batches vary), then the optimiser step. On exit the hooks
    and every Opacus attribute are removed, and the model is frozen and in eval mode again.
    Accounting is the caller's (see `train_local_private`).
    """

    def __init__(self, model: nn.Module, method: FederatedMethod, *, lr: float, optimizer: str,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: float,
                 generator: torch.Generator | None = None):
        self.model, self.method = model, method
        self.lr, self.optimizer_name = lr, optimizer
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self.expected_batch_size, self.generator = expected_batch_size, generator
        self.params: list[nn.Parameter] = []
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> PrivateStepper:
        self.params = set_trainable(self.model, self.method.trained)
        if not self.params:
            raise RuntimeError(f"method {self.method.name} has no trainable tensors in this model")
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(grad_sample_hooks(self.model, self.params))
        # The optimiser is fresh per call, like train_local's: its state is not federated.
        self.optimizer = DPOptimizer(
            make_optimizer(self.params, self.optimizer_name, self.lr),
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size, loss_reduction="mean", generator=self.generator)
        self.model.train()
        return self

    def step(self, batch: Batch | None) -> float:
        """One DP-SGD step on a (Poisson) batch; None or an empty batch is a noise-only step.

        Returns the sum of the batch's per-example losses (0 for an empty batch).
        """
        self.optimizer.zero_grad(set_to_none=True)
        if batch is None or len(next(iter(batch.values()))) == 0:
            # Empty Poisson batch: no forward pass; zero per-sample gradients, so the update is
            # pure noise, exactly as the accountant (which counts every step) assumes.
            # Opacus internal: DPOptimizer reads p.grad_sample (opacus is bounded in pyproject.toml).
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            loss = 0.0
        else:
            losses = per_example_loss(self.model, batch)
            losses.sum().backward()
            loss = float(losses.detach().sum())
        self.optimizer.step()
        return loss

    def __exit__(self, *exc: object) -> None:
        try:
            if self._stack is not None:
                self._stack.close()
        finally:
            self.model.eval()
            self.model.requires_grad_(False)


def seeded_generator(seed: int | None, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one random stream of a client's round: `seed` None draws fresh OS entropy.

    Streams (distinct, so their draws are independent): 1 the DP-SGD Poisson sampler, 2 the DP-SGD
    noise (here); 3 the private init's Poisson sample, 4 its noise (`private_init`).
    """
    # Seeded runs are reproducible (a simulator's need). Noise generators live on the parameters'
    # device (torch.normal needs that).
    value = (int.from_bytes(os.urandom(8), "little") % (2**63) if seed is None
             else (int(seed) * 1_000_003 + stream) % (2**63 - 1))
    return torch.Generator(device=device).manual_seed(value)


def train_local_private(
    model: nn.Module, method: FederatedMethod, dataset: Mapping[str, torch.Tensor], steps: int,
    lr: float, ledger: PrivacyLedger, *, optimizer: str = "adamw", seed: int | None = None,
    report_loss: bool = False, before_step: Callable[[], None] | None = None,
) -> TrainResult:
    """`steps` DP-SGD steps on the tensors the method trains, charged to the client's ledger.

    `dataset` is the client's whole tokenised data (input_ids, attention_mask, labels; N rows):
    each step draws a Poisson batch (every example independently with the ledger's sample
    rate, via Opacus's UniformWithReplacementSampler). Noise multiplier, clipping norm and
    sample rate are the ledger's, so training and accounting cannot disagree. Raises
    BudgetExceeded before any step if the round would overspend, and RuntimeError if a
    trainable tensor did not change (the noise alone changes every one it reaches).

    The result's `examples` is the *expected* number of examples (steps * q * n), a public
    number: the actual Poisson count depends on the data and is not released. Likewise `loss`
    (the mean per-example training loss) is NaN unless `report_loss`, since releasing it is not
    covered by the accounting. `before_step` runs before each step (nested ranks sample one there).
    """
    n = len(dataset["input_ids"])
    if n != ledger.num_examples:
        raise ValueError(f"the ledger was calibrated for {ledger.num_examples} examples, the data has {n}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    reason = ledger.check_budget(steps)
    if reason is not None:
        raise BudgetExceeded(reason)
    q = ledger.sample_rate
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=seeded_generator(seed, 1),
                                            steps=steps)
    device = dataset["input_ids"].device
    stepper = PrivateStepper(model, method, lr=lr, optimizer=optimizer,
                             noise_multiplier=ledger.noise_multiplier, max_grad_norm=ledger.max_grad_norm,
                             expected_batch_size=q * n, generator=seeded_generator(seed, 2, device))
    loss_sum, seen = 0.0, 0
    with stepper:
        before = [p.detach().clone() for p in stepper.params]
        names = {id(p): name for name, p in model.named_parameters()}
        for indices in sampler:
            if before_step is not None:
                before_step()
            index = torch.as_tensor(indices, dtype=torch.long, device=device)
            loss_sum += stepper.step({k: v[index] for k, v in dataset.items()})
            seen += len(indices)
            ledger.record(1)  # per step: a failure mid-round still leaves the steps taken charged
        stale = [names[id(p)] for p, old in zip(stepper.params, before, strict=True) if torch.equal(p, old)]
    if stale:
        raise RuntimeError(f"DP training left {len(stale)} trainable tensor(s) unchanged, e.g. {stale[:3]}: "
                           "their gradients (and noise) never reached them")
    loss = loss_sum / max(seen, 1) if report_loss else math.nan
    return TrainResult(loss, steps, round(steps * q * n))
