"""Differential privacy for clients: Opacus DP-SGD, a per-client privacy ledger, a hard budget.

The guarantee (DESIGN.md section 5): sample-level (epsilon, delta)-DP for each client with
respect to its own local dataset (add/remove one example), composed over every round it
trains in. It holds for what leaves the client: the trained tensors (and, for Fed-SB's
`init.source=clients`, the privatised init gradient). No plain PyTorch code here differs from
Opacus's own: per-sample gradients come from `opacus.grad_sample.GradSampleHooks`, clipping
and noise from `opacus.optimizers.DPOptimizer`, Poisson sampling from
`opacus.utils.uniform_sampler.UniformWithReplacementSampler`, epsilon from Opacus accountants.

Calibrate once, compose always: a client's noise multiplier is calibrated once for the whole
run (target epsilon, delta, its sample rate, the largest number of local steps it could take
over all rounds, plus the init charge if any), and its `PrivacyLedger` (an Opacus accountant's
history plus those constants) travels in the client's state between rounds as a JSON dict.

The model is shared by many virtual clients of one process: the Opacus hooks are attached for
the duration of one call and removed afterwards, and the base model is never copied.

No Flower imports here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleHooks, register_grad_sampler
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.core.adapters import AdapterLayer, set_trainable
from fedsb.experiment.config import ExperimentConfig, PrivacyConfig
from fedsb.methods.base import FederatedMethod
from fedsb.training.local import TrainResult, make_optimizer

# Opacus calls logging.basicConfig() when imported; that root handler would print every line of the
# host application's log a second time (Flower's logger propagates to the root logger).
_OPACUS_LOG_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"
for _handler in list(logging.getLogger().handlers):
    if getattr(_handler.formatter, "_fmt", None) == _OPACUS_LOG_FORMAT:
        logging.getLogger().removeHandler(_handler)

ACCOUNTANTS = ("rdp", "prv")
DEFAULT_DELTA = 1e-5
LEDGER_VERSION = 1
# The private init materialises per-sample gradients of whole base weights (in x out each):
# a few examples at a time keeps that memory bounded (MiniLM: ~42 MB per example).
INIT_MICRO_BATCH = 4

Batch = Mapping[str, torch.Tensor]


class BudgetExceeded(RuntimeError):
    """A client's next local round would push its epsilon past the target: it must not train."""


# --- Opacus: a per-sample gradient rule for transformers' Conv1D (GPT-2) ------------------------

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


# --- delta and calibration ---------------------------------------------------------------------

def resolve_delta(delta: float | None, num_examples: int) -> float:
    """The delta of a client with `num_examples` examples: the configured one, or the default.

    Default (delta None): min(1e-5, 1 / (10 n)), always strictly below 1/n, as a meaningful
    delta must be (a mechanism that publishes one random example outright is (0, 1/n)-DP).
    A configured delta that is not below 1/n is refused.
    """
    if num_examples < 1:
        raise ValueError(f"a client needs at least one example for DP training, got {num_examples}")
    if delta is None:
        return min(DEFAULT_DELTA, 1.0 / (10 * num_examples))
    if not 0 < delta < 1.0 / num_examples:
        raise ValueError(f"privacy.delta: got {delta!r}; accepted: a number in (0, 1/n) = "
                         f"(0, {1.0 / num_examples:.3g}) for a client with n={num_examples} examples")
    return float(delta)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Opacus warns when the best RDP order is the largest one tried (the bound stays valid,
    # only looser) and the PRV accountant divides by log(1 - q) = -inf at q = 1 (harmless).
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _epsilon(mechanism: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of an accountant history [(noise_multiplier, sample_rate, steps), ...]."""
    if not history:
        return 0.0
    accountant = create_accountant(mechanism)
    accountant.history = [tuple(h) for h in history]
    with _quiet():
        return float(accountant.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, total_steps: int,
                    accountant: str = "rdp", *, init_noise_multiplier: float | None = None,
                    init_sample_rate: float = 1.0, epsilon_tolerance: float = 0.01) -> float:
    """The noise multiplier for which `total_steps` DP-SGD steps spend at most `target_epsilon`.

    Without an init charge this is Opacus's `get_noise_multiplier`. With one (Fed-SB's private
    init: one Poisson-subsampled Gaussian step of `init_noise_multiplier` at `init_sample_rate`),
    the same bisection runs on the composed history [init step, training steps], so that the
    whole run, init included, stays within the target. Cached: clients of equal size share it.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant: got {accountant!r}; accepted: {', '.join(ACCOUNTANTS)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if init_noise_multiplier is None:
        with _quiet():
            return float(get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=total_steps, accountant=accountant, epsilon_tolerance=epsilon_tolerance))
    prior = [(float(init_noise_multiplier), float(init_sample_rate), 1)]
    init_epsilon = _epsilon(accountant, prior, delta)
    if init_epsilon >= target_epsilon:
        raise ValueError(
            f"privacy.init_noise_multiplier: the private init alone spends epsilon {init_epsilon:.3f}, "
            f"not below the target epsilon {target_epsilon}; raise it or use init.source=server")

    def spent(sigma: float) -> float:
        return _epsilon(accountant, [*prior, (sigma, sample_rate, total_steps)], delta)

    # Opacus's bisection (opacus.accountants.utils.get_noise_multiplier) on a composed history.
    low, high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        high *= 2
        eps_high = spent(high)
        if high > 1e6:
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (low + high) / 2
        eps = spent(sigma)
        if eps < target_epsilon:
            high, eps_high = sigma, eps
        else:
            low = sigma
    return high


# --- the ledger ---------------------------------------------------------------------------------

class PrivacyLedger:
    """One client's privacy accounting for a whole run: constants plus an Opacus accountant.

    Every DP-SGD step is one Poisson-subsampled Gaussian mechanism (noise_multiplier,
    sample_rate); the private init, if any, one more (init_noise_multiplier, init_sample_rate).
    `epsilon()` is the composed epsilon of everything recorded so far at this client's delta.
    """

    def __init__(self, *, noise_multiplier: float, sample_rate: float, delta: float,
                 target_epsilon: float, max_grad_norm: float, num_examples: int,
                 accountant: str = "rdp", init_noise_multiplier: float | None = None,
                 init_sample_rate: float | None = None, max_steps: int | None = None):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant: got {accountant!r}; accepted: {', '.join(ACCOUNTANTS)}")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.target_epsilon = float(target_epsilon)
        self.max_grad_norm = float(max_grad_norm)
        self.num_examples = int(num_examples)
        self.mechanism = accountant
        self.init_noise_multiplier = None if init_noise_multiplier is None else float(init_noise_multiplier)
        self.init_sample_rate = None if init_sample_rate is None else float(init_sample_rate)
        self.max_steps = max_steps
        self.accountant: IAccountant = create_accountant(accountant)
        self.steps = 0  # DP-SGD steps recorded (the init not counted)
        self.init_charged = False
        self._cache: tuple[Any, float] | None = None

    @classmethod
    def create(cls, *, target_epsilon: float, delta: float, sample_rate: float, max_steps: int,
               max_grad_norm: float, num_examples: int, accountant: str = "rdp",
               init_noise_multiplier: float | None = None, init_sample_rate: float | None = None
               ) -> PrivacyLedger:
        """A fresh ledger whose noise multiplier is calibrated for `max_steps` (+ the init, if any)."""
        sigma = calibrate_noise(float(target_epsilon), float(delta), float(sample_rate), int(max_steps),
                                accountant, init_noise_multiplier=init_noise_multiplier,
                                init_sample_rate=1.0 if init_sample_rate is None else float(init_sample_rate))
        return cls(noise_multiplier=sigma, sample_rate=sample_rate, delta=delta,
                   target_epsilon=target_epsilon, max_grad_norm=max_grad_norm, num_examples=num_examples,
                   accountant=accountant, init_noise_multiplier=init_noise_multiplier,
                   init_sample_rate=init_sample_rate, max_steps=max_steps)

    # -- epsilon -----------------------------------------------------------------------------
    def _history(self) -> list[tuple[float, float, int]]:
        return [tuple(h) for h in self.accountant.history]

    def epsilon(self) -> float:
        """The composed epsilon of every step recorded so far (0 before any)."""
        key = repr(self.accountant.history)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, _epsilon(self.mechanism, self._history(), self.delta))
        return self._cache[1]

    def _stepped(self, steps: int) -> IAccountant:
        """A copy of the accountant that has taken `steps` more DP-SGD steps."""
        accountant = create_accountant(self.mechanism)
        accountant.history = copy.deepcopy(self.accountant.history)
        for _ in range(steps):
            accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return accountant

    def epsilon_after(self, steps: int) -> float:
        """The epsilon this client would have spent after `steps` more steps (no change here)."""
        return _epsilon(self.mechanism, [tuple(h) for h in self._stepped(steps).history], self.delta)

    def check_budget(self, steps: int) -> str | None:
        """None if `steps` more steps stay within the target; else the reason to refuse them."""
        after = self.epsilon_after(steps)
        if after <= self.target_epsilon:
            return None
        return (f"privacy budget: {steps} more local steps would take epsilon from {self.epsilon():.4f} "
                f"to {after:.4f}, above the target epsilon {self.target_epsilon:g} "
                f"(delta {self.delta:.3g}, {self.steps} steps taken so far)")

    # -- recording ---------------------------------------------------------------------------
    def record(self, steps: int) -> None:
        """Charge `steps` DP-SGD steps at this ledger's noise multiplier and sample rate."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        for _ in range(steps):
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps += steps

    def record_init(self) -> None:
        """Charge the private init: one Gaussian mechanism step (init_noise_multiplier, init_sample_rate)."""
        if self.init_noise_multiplier is None or self.init_sample_rate is None:
            raise ValueError("this ledger was calibrated without a private init; it cannot be charged")
        if self.init_charged:
            raise ValueError("the private init was already charged to this ledger")
        self.accountant.step(noise_multiplier=self.init_noise_multiplier, sample_rate=self.init_sample_rate)
        self.init_charged = True

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state (floats round-trip exactly through JSON)."""
        accountant = self.accountant.state_dict()
        return {
            "version": LEDGER_VERSION,
            "accountant": {"mechanism": accountant["mechanism"],
                           "history": [[float(s), float(q), int(k)] for s, q, k in accountant["history"]]},
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "delta": self.delta, "target_epsilon": self.target_epsilon,
            "max_grad_norm": self.max_grad_norm, "num_examples": self.num_examples,
            "init_noise_multiplier": self.init_noise_multiplier, "init_sample_rate": self.init_sample_rate,
            "max_steps": self.max_steps, "steps": self.steps, "init_charged": self.init_charged,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        if state.get("version") != LEDGER_VERSION:
            raise ValueError(f"privacy ledger state version {state.get('version')!r}; "
                             f"expected {LEDGER_VERSION}")
        acc = state["accountant"]
        ledger = cls(noise_multiplier=state["noise_multiplier"], sample_rate=state["sample_rate"],
                     delta=state["delta"], target_epsilon=state["target_epsilon"],
                     max_grad_norm=state["max_grad_norm"], num_examples=state["num_examples"],
                     accountant=acc["mechanism"], init_noise_multiplier=state["init_noise_multiplier"],
                     init_sample_rate=state["init_sample_rate"], max_steps=state["max_steps"])
        # Opacus's own loader checks the mechanism; RDP/PRV histories hold tuples.
        history = [(float(s), float(q), int(k)) for s, q, k in acc["history"]]
        ledger.accountant.load_state_dict({"mechanism": acc["mechanism"], "history": history})
        ledger.steps = int(state["steps"])
        ledger.init_charged = bool(state["init_charged"])
        return ledger

    def to_json(self) -> str:
        return json.dumps(self.state_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        return cls.from_state_dict(json.loads(text))

    def metrics(self) -> dict[str, float]:
        """Numbers for a round's metrics / the summary (all public, data-independent)."""
        return {"epsilon": self.epsilon(), "delta": self.delta, "target_epsilon": self.target_epsilon,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.sample_rate, "dp_steps": float(self.steps)}

    def __repr__(self) -> str:
        return (f"PrivacyLedger(epsilon={self.epsilon():.4f}/{self.target_epsilon:g}, "
                f"delta={self.delta:.3g}, sigma={self.noise_multiplier:.4f}, q={self.sample_rate:.4g}, "
                f"steps={self.steps})")


def max_local_steps(config: ExperimentConfig) -> int:
    """The DP-SGD steps a client's noise is calibrated for: local_steps per round, for every round
    (a client may be sampled in all of them) unless privacy.calibration_rounds says fewer."""
    rounds = config.privacy.calibration_rounds or config.federation.rounds
    return rounds * config.train.local_steps


def charges_init(config: ExperimentConfig) -> bool:
    """Whether each client's ledger pays for a private Fed-SB init (init.source=clients)."""
    return (config.privacy.enabled and config.method.name == "fedsb"
            and config.method.init.source == "clients")


def privacy_status(config: ExperimentConfig) -> str:
    """'off', 'private', or 'not private: ...' (DP on, but the init pooled the clients' raw data)."""
    if not config.privacy.enabled:
        return "off"
    if config.method.name == "fedsb" and config.method.init.source == "pooled":
        return "not private: the Fed-SB init pooled every client's raw data (privacy.allow_pooled_init)"
    return "private"


def ledger_for_client(config: ExperimentConfig | PrivacyConfig, num_examples: int, *,
                      batch_size: int | None = None, max_steps: int | None = None,
                      init_num_samples: int | None = None) -> PrivacyLedger:
    """A calibrated fresh ledger for a client with `num_examples` examples.

    From an ExperimentConfig everything is derived: sample rate = min(1, train.batch_size / n),
    max_steps = `max_local_steps(config)`, and the init charge when `charges_init(config)` (Poisson
    rate min(1, init.num_samples / n)). From a bare PrivacyConfig pass batch_size and max_steps
    (and init_num_samples to plan an init charge).
    """
    if isinstance(config, ExperimentConfig):
        privacy = config.privacy
        batch_size = config.train.batch_size if batch_size is None else batch_size
        max_steps = max_local_steps(config) if max_steps is None else max_steps
        if init_num_samples is None and charges_init(config):
            init_num_samples = config.method.init.num_samples
    else:
        privacy = config
        if batch_size is None or max_steps is None:
            raise ValueError("from a PrivacyConfig, pass batch_size and max_steps")
    delta = resolve_delta(privacy.delta, num_examples)
    init_sigma = init_rate = None
    if init_num_samples is not None:
        init_sigma, init_rate = privacy.init_noise_multiplier, min(1.0, init_num_samples / num_examples)
    return PrivacyLedger.create(
        target_epsilon=privacy.epsilon, delta=delta, sample_rate=min(1.0, batch_size / num_examples),
        max_steps=max_steps, max_grad_norm=privacy.max_grad_norm, num_examples=num_examples,
        accountant=privacy.accountant, init_noise_multiplier=init_sigma, init_sample_rate=init_rate)


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


# --- per-sample gradients and DP-SGD steps on a shared model -----------------------------------

def _cleanup(model: nn.Module, hooks: GradSampleHooks, params: list[nn.Parameter]) -> None:
    """Leave no trace of Opacus on the shared model: hooks, per-sample buffers, activations."""
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
def _grad_sample_hooks(model: nn.Module, params: list[nn.Parameter]) -> Iterator[GradSampleHooks]:
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
        with _grad_sample_hooks(model, params):
            per_example_loss(model, batch).sum().backward()
            return {names[id(p)]: p.grad_sample.detach().clone() for p in params}
    finally:
        model.train(was_training)
        model.requires_grad_(False)


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
        self._stack.enter_context(_grad_sample_hooks(self.model, self.params))
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


def _generator(seed: int | None, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    # Seeded runs are reproducible (a simulator's need); seed None draws fresh OS entropy.
    # Noise generators live on the parameters' device (torch.normal needs that).
    value = (int.from_bytes(os.urandom(8), "little") % (2**63) if seed is None
             else (int(seed) * 1_000_003 + stream) % (2**63 - 1))
    return torch.Generator(device=device).manual_seed(value)


def train_local_private(
    model: nn.Module, method: FederatedMethod, dataset: Mapping[str, torch.Tensor], steps: int,
    lr: float, ledger: PrivacyLedger, *, optimizer: str = "adamw", seed: int | None = None,
    report_loss: bool = False,
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
    covered by the accounting.
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
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=_generator(seed, 1),
                                            steps=steps)
    device = dataset["input_ids"].device
    stepper = PrivateStepper(model, method, lr=lr, optimizer=optimizer,
                             noise_multiplier=ledger.noise_multiplier, max_grad_norm=ledger.max_grad_norm,
                             expected_batch_size=q * n, generator=_generator(seed, 2, device))
    loss_sum, seen = 0.0, 0
    with stepper:
        before = [p.detach().clone() for p in stepper.params]
        names = {id(p): name for name, p in model.named_parameters()}
        for indices in sampler:
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


# --- Fed-SB's init gradient under DP ---------------------------------------------------------------

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
                                                      generator=_generator(seed, 3), steps=1)))
    sums = {name: torch.zeros_like(layer.weight) for name, layer in layers.items()}
    # The mechanism is charged before it runs, so a failure can never release an uncharged result.
    ledger.record_init()
    try:
        with _grad_sample_hooks(model, weights):
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
    generator = _generator(seed, 4, next(iter(sums.values())).device)
    out = {}
    for name, layer in layers.items():
        noisy = sums[name] + torch.normal(0.0, sigma * ledger.max_grad_norm, size=sums[name].shape,
                                          generator=generator, dtype=sums[name].dtype,
                                          device=sums[name].device)
        out[name] = (noisy.T if isinstance(layer, Conv1D) else noisy).contiguous()
    return out
