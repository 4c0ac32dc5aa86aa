"""Differential privacy for clients: Opacus DP-SGD, a per-client privacy ledger, a hard budget.

The guarantee (docs/architecture.md section 5): sample-level (epsilon, delta)-DP for each client with
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

The parts, each imported from its own module (nothing is re-exported here; what an experiment's
config means for privacy, its step budget and a client's calibrated ledger, is
`fedsb.experiment.privacy`):

- `accounting`: delta, noise calibration, `PrivacyLedger`, `BudgetExceeded` (no torch; JSON state)
- `per_sample`: per-example losses and their per-sample gradients via Opacus hooks on a shared model
- `dpsgd`: the private optimiser step (`PrivateStepper`) and a client's round (`train_local_private`)
- `private_init`: Fed-SB's init gradient under DP (`privatize_init_gradient`)

No Flower imports here.
"""

from __future__ import annotations

import logging

import opacus  # noqa: F401  (imported for its side effect, undone below)

# Opacus calls logging.basicConfig() when imported; that root handler would print every line of the
# host application's log a second time (Flower's logger propagates to the root logger). Done here,
# once, because every module of this package imports Opacus.
_OPACUS_LOG_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"
for _handler in list(logging.getLogger().handlers):
    if getattr(_handler.formatter, "_fmt", None) == _OPACUS_LOG_FORMAT:
        logging.getLogger().removeHandler(_handler)
