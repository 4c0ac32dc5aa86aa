"""What an experiment config means for privacy: step budget, init charge, status, a client's ledger.

The glue between the experiment's config and `fedsb.training.privacy.accounting` (it lives here,
in the experiment layer, because it reads the config): how many DP-SGD steps a client's
noise is calibrated for, whether its ledger also pays for Fed-SB's private init, whether the run
is private at all, and the calibrated fresh ledger for a client of a given size.
"""

from __future__ import annotations

from fedsb.experiment.config import ExperimentConfig, PrivacyConfig
from fedsb.experiment.validation import uses_init_gradients
from fedsb.training.privacy.accounting import PrivacyLedger, resolve_delta


def max_local_steps(config: ExperimentConfig) -> int:
    """The DP-SGD steps a client's noise is calibrated for: local_steps per round, for every round
    (a client may be sampled in all of them) unless privacy.calibration_rounds says fewer."""
    rounds = config.privacy.calibration_rounds or config.federation.rounds
    return rounds * config.train.local_steps


def charges_init(config: ExperimentConfig) -> bool:
    """Whether each client's ledger pays for a private gradient-based init (init.source=clients)."""
    return (config.privacy.enabled and config.method.init.source == "clients"
            and uses_init_gradients(config))


def privacy_status(config: ExperimentConfig) -> str:
    """'off', 'private', or 'not private: ...' (DP on, but the init pooled the clients' raw data)."""
    if not config.privacy.enabled:
        return "off"
    if config.method.init.source == "pooled" and uses_init_gradients(config):
        return "not private: the init pooled every client's raw data (privacy.allow_pooled_init)"
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
