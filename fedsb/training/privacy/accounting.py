"""Privacy accounting: delta, noise calibration, and each client's `PrivacyLedger`.

Small and serialisable, in the manner of `opacus.accountants`: no torch code, no model. A ledger is a
client's constants (noise multiplier, sample rate, delta, target epsilon, clipping norm) plus an
Opacus accountant's history; it round-trips through a plain JSON dict so it can travel in the
client's state between rounds. `calibrate_noise` picks the noise multiplier once for a whole run
(the init charge included, when Fed-SB's private init is on).

Opacus internals: `_epsilon` and `PrivacyLedger._stepped` set `accountant.history` directly and
rely on its format, a list of (noise_multiplier, sample_rate, steps) tuples; `calibrate_noise`
repeats `opacus.accountants.utils.get_noise_multiplier`'s bisection on a composed history. Hence
the upper bound on opacus in pyproject.toml.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")
DEFAULT_DELTA = 1e-5
LEDGER_VERSION = 1


class BudgetExceeded(RuntimeError):
    """A client's next local round would push its epsilon past the target: it must not train."""


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
    # Opacus internal: the accountant's history list (opacus is bounded in pyproject.toml for this).
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

    # Opacus's bisection (opacus.accountants.utils.get_noise_multiplier) on a composed history; a copy
    # of its internals, one reason opacus is bounded in pyproject.toml.
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
        # Opacus internal: the accountant's history list (opacus is bounded in pyproject.toml for this).
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
        """The ledger `state_dict()` described (refuses another LEDGER_VERSION)."""
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
        """`state_dict()` as JSON text (how a ledger travels in a Flower client's state)."""
        return json.dumps(self.state_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """The ledger `to_json()` wrote."""
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
