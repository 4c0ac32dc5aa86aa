"""Differential privacy (docs/architecture.md section 5): ledger, budget, per-sample gradients,
DP-SGD, private init."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import METHOD_NAMES, random_batch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from torch import nn

from fedsb.core.adapters import HEAD, State, component_of, extract_state, load_state
from fedsb.core.init import accumulate_gradients
from fedsb.core.models import find_target_modules, load_model
from fedsb.experiment.config import ConfigError, load_config
from fedsb.experiment.privacy import ledger_for_client, privacy_status
from fedsb.methods import build_method
from fedsb.training.privacy.accounting import BudgetExceeded, PrivacyLedger, calibrate_noise, resolve_delta
from fedsb.training.privacy.dpsgd import PrivateStepper, train_local_private
from fedsb.training.privacy.per_sample import per_example_loss, per_sample_gradients
from fedsb.training.privacy.private_init import privatize_init_gradient

DELTA = 1e-5


# --- helpers -------------------------------------------------------------------------------------

def no_dropout(model: nn.Module) -> nn.Module:
    """Deterministic train-mode forward passes (Opacus records activations only in train mode)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def setup(arch: str, method_name: str, task: str = "classification", rank: int = 4):
    """A tiny model with the method's adapters, every adapter tensor non-zero (all get gradients)."""
    model = no_dropout(load_model(arch, task=task, num_labels=3, seed=0))
    targets = find_target_modules(model)
    method = build_method(method_name, model, targets, rank, 2.0 * rank)
    g = torch.Generator().manual_seed(1)
    gradients = {name: torch.randn(spec.out_features, spec.in_features, generator=g)
                 for name, spec in method.specs.items()}
    state = method.initial_state(model, g, gradients if method.init_gradients else None, lr_eff=1e-2)
    # LoRA's B starts at zero, which would give A zero gradients: perturb every adapter tensor.
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if component_of(k) != HEAD else v
             for k, v in state.items()}
    load_state(model, state)
    return model, method, targets


def causal_batch(seed: int, size: int = 5, length: int = 10) -> dict[str, torch.Tensor]:
    """Token batch with right padding of different lengths; labels are the ids, padding ignored."""
    batch = random_batch(seed, size, length)
    mask = torch.ones(size, length, dtype=torch.long)
    for i in range(size):
        mask[i, length - i:] = 0  # example i has i padding tokens
    ids = batch["input_ids"].masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def expected_trained(model: nn.Module, components: tuple[str, ...]) -> set[str]:
    """Parameter names a method trains, spelled out: its adapter components plus the task head."""
    names = [name for name, _ in model.named_parameters()]
    return ({n for n in names if n.endswith(".weight") and n.rsplit(".", 2)[-2] in components}
            | {n for n in names if n.split(".")[0] in ("classifier", "score")})


def snapshot(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in {**dict(model.named_parameters()),
                                               **dict(model.named_buffers())}.items()}


def assert_no_opacus_traces(model: nn.Module) -> None:
    assert not hasattr(model, "autograd_grad_sample_hooks")
    for name, p in model.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name
        for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"):
            assert not hasattr(p, attr), (name, attr)
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._backward_hooks, name
        assert "activations" not in module.__dict__, name


def one_shot_rdp(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon from the analytic RDP formulas, summed over the history (no accountant object)."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=k, orders=orders)
              for s, q, k in history)
    with warnings.catch_warnings():  # "optimal order is the largest/smallest alpha": still a bound
        warnings.simplefilter("ignore", UserWarning)
        return float(rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def roundtrip(ledger: PrivacyLedger) -> PrivacyLedger:
    """As between two Flower rounds: the state as a JSON string, then back."""
    return PrivacyLedger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))


# --- the ledger: calibrate once, compose always ----------------------------------------------------

@pytest.mark.parametrize("with_init", [False, True])
def test_composed_epsilon_over_rounds_equals_one_shot_and_stays_within_target(with_init):
    rounds, local_steps, q, target = 6, 5, 0.04, 2.0
    init = (6.0, 0.25) if with_init else (None, None)
    ledger = PrivacyLedger.create(target_epsilon=target, delta=DELTA, sample_rate=q,
                                  max_steps=rounds * local_steps, max_grad_norm=1.0, num_examples=400,
                                  init_noise_multiplier=init[0], init_sample_rate=init[1])
    sigma = ledger.noise_multiplier
    direct = RDPAccountant()  # stepped independently, one step at a time
    if with_init:
        ledger.record_init()
        direct.step(noise_multiplier=init[0], sample_rate=init[1])
    previous = ledger.epsilon()
    for r in range(1, rounds + 1):
        ledger = roundtrip(ledger)
        assert ledger.check_budget(local_steps) is None
        predicted = ledger.epsilon_after(local_steps)
        ledger.record(local_steps)
        for _ in range(local_steps):
            direct.step(noise_multiplier=sigma, sample_rate=q)
        eps = ledger.epsilon()
        history = ([(init[0], init[1], 1)] if with_init else []) + [(sigma, q, r * local_steps)]
        assert eps == pytest.approx(predicted, rel=1e-12)
        assert eps == pytest.approx(direct.get_epsilon(DELTA), rel=1e-12)
        assert eps == pytest.approx(one_shot_rdp(history, DELTA), rel=1e-9)
        assert previous < eps <= target
        previous = eps
    assert ledger.steps == rounds * local_steps
    assert target - 0.02 <= ledger.epsilon() <= target  # calibrated for exactly these steps
    assert ledger.check_budget(1) is not None


def test_prv_accountant_composes_like_a_one_shot_prv_accountant():
    q, steps = 0.05, 12
    # Not calibrated (a PRV calibration takes seconds): the composition is what is tested here.
    ledger = PrivacyLedger(noise_multiplier=1.2, sample_rate=q, delta=DELTA, target_epsilon=10.0,
                           max_grad_norm=1.0, num_examples=320, accountant="prv")
    for _ in range(3):
        ledger = roundtrip(ledger)
        ledger.record(steps // 3)
    one_shot = PRVAccountant()
    one_shot.history = [(1.2, q, steps)]
    assert ledger.epsilon() == pytest.approx(one_shot.get_epsilon(DELTA), rel=1e-9)
    assert 0 < ledger.epsilon() < ledger.epsilon_after(1)


def test_calibration_matches_opacus_and_counts_the_init():
    plain = calibrate_noise(3.0, DELTA, 0.05, 40)
    with_init = calibrate_noise(3.0, DELTA, 0.05, 40, init_noise_multiplier=2.0, init_sample_rate=1.0)
    assert with_init > plain  # the init spends part of the budget: training needs more noise
    with pytest.raises(ValueError, match="init alone spends epsilon"):
        calibrate_noise(0.5, DELTA, 0.05, 40, init_noise_multiplier=1.0, init_sample_rate=1.0)


def test_state_dict_is_plain_json_and_round_trips():
    ledger = PrivacyLedger.create(target_epsilon=3.0, delta=DELTA, sample_rate=0.1, max_steps=20,
                                  max_grad_norm=0.5, num_examples=160)
    ledger.record(7)
    text = ledger.to_json()
    again = PrivacyLedger.from_json(text)
    assert again.state_dict() == ledger.state_dict() and again.to_json() == text
    assert again.epsilon() == ledger.epsilon() > 0
    metrics = again.metrics()
    assert metrics["dp_steps"] == 7 and metrics["max_grad_norm"] == 0.5 and metrics["delta"] == DELTA


def test_budget_guard_refuses_a_round_that_would_overspend():
    model, method, _ = setup("tiny-bert", "fedsb")
    data = random_batch(0, size=20)
    ledger = PrivacyLedger.create(target_epsilon=1.0, delta=DELTA, sample_rate=0.2, max_steps=4,
                                  max_grad_norm=1.0, num_examples=20)
    assert ledger.check_budget(4) is None
    reason = ledger.check_budget(6)
    assert reason is not None and "epsilon" in reason and "target epsilon 1" in reason
    train_local_private(model, method, data, 3, 1e-2, ledger, seed=0)
    before = ledger.state_dict()
    with pytest.raises(BudgetExceeded, match="above the target epsilon"):
        train_local_private(model, method, data, 2, 1e-2, ledger, seed=1)
    assert ledger.state_dict() == before  # refused: nothing trained, nothing charged
    train_local_private(model, method, data, 1, 1e-2, ledger, seed=2)  # the last allowed step
    assert ledger.steps == 4 and ledger.epsilon() <= 1.0
    assert_no_opacus_traces(model)


def test_delta_default_is_below_one_over_n_and_a_large_delta_is_refused():
    for n in (1, 50, 10_000, 1_000_000):
        assert 0 < resolve_delta(None, n) < 1 / n
    assert resolve_delta(1e-6, 1000) == 1e-6
    with pytest.raises(ValueError, match="privacy.delta"):
        resolve_delta(0.01, 1000)


def test_ledger_for_client_plans_the_private_init_from_the_config():
    config = load_config(None, {"privacy.enabled": True, "method.init.source": "clients",
                                "federation.rounds": 3, "train.local_steps": 4, "train.batch_size": 8})
    ledger = ledger_for_client(config, 200)
    assert (ledger.sample_rate, ledger.max_steps, ledger.delta) == (8 / 200, 12, DELTA)
    assert ledger.init_sample_rate == min(1.0, config.method.init.num_samples / 200)
    ledger.record_init()
    ledger.record(12)
    assert ledger.epsilon() <= config.privacy.epsilon
    plain = ledger_for_client(load_config(None, {"privacy.enabled": True, "federation.rounds": 3,
                                                 "train.local_steps": 4, "train.batch_size": 8}), 200)
    assert plain.init_noise_multiplier is None and plain.noise_multiplier < ledger.noise_multiplier
    # Calibrated for 2 of the 3 rounds: less noise, and a third round is refused.
    short = ledger_for_client(load_config(None, {"privacy.enabled": True, "federation.rounds": 3,
                                                 "privacy.calibration_rounds": 2, "train.local_steps": 4,
                                                 "train.batch_size": 8}), 200)
    assert short.max_steps == 8 and short.noise_multiplier < plain.noise_multiplier
    short.record(8)
    assert short.epsilon() <= 3.0 and "above the target epsilon" in short.check_budget(4)


# --- per-sample gradients ------------------------------------------------------------------------

@pytest.mark.parametrize("arch, task", [("tiny-bert", "classification"), ("tiny-llama", "causal_lm")])
@pytest.mark.parametrize("method_name", METHOD_NAMES)
def test_per_sample_gradients_match_one_example_at_a_time(arch, task, method_name):
    model, method, _ = setup(arch, method_name, task)
    batch = random_batch(3, size=5, length=10) if task == "classification" else causal_batch(3)
    per_sample = per_sample_gradients(model, method, batch)
    assert set(per_sample) == expected_trained(model, method.trainable) and per_sample
    # Reference: HF's own loss on one example at a time (batch size 1: nothing to couple).
    model.train()
    params = dict(model.named_parameters())
    for name in per_sample:
        params[name].requires_grad_(True)
    for i in range(len(batch["input_ids"])):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        loss = model(**one).loss
        assert torch.allclose(loss, per_example_loss(model, one)[0], atol=1e-6)
        loss.backward()
        for name, grads in per_sample.items():
            torch.testing.assert_close(grads[i], params[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    model.requires_grad_(False)
    model.eval()


def test_causal_lm_loss_is_per_sequence_not_per_batch_token():
    model, _, _ = setup("tiny-llama", "fedit", "causal_lm")
    batch = causal_batch(5)
    losses = per_example_loss(model, batch)
    singles = torch.stack([model(**{k: v[i:i + 1] for k, v in batch.items()}).loss for i in range(5)])
    torch.testing.assert_close(losses, singles, atol=1e-5, rtol=1e-5)
    # HF's batch loss averages tokens over the batch: not the mean of per-sequence means here.
    assert not torch.allclose(model(**batch).loss, losses.mean(), atol=1e-4)


# --- DP-SGD on the shared model --------------------------------------------------------------------

@pytest.mark.parametrize("method_name", METHOD_NAMES)
def test_private_training_changes_exactly_the_trained_tensors(method_name):
    model, method, _ = setup("tiny-bert", method_name)
    data = random_batch(1, size=24)
    ledger = PrivacyLedger.create(target_epsilon=5.0, delta=DELTA, sample_rate=0.25, max_steps=6,
                                  max_grad_norm=1.0, num_examples=24)
    before = snapshot(model)
    result = train_local_private(model, method, data, 3, 1e-2, ledger, seed=0)
    after = snapshot(model)
    trained_params = expected_trained(model, method.trainable)
    assert any(n.startswith("classifier.") for n in trained_params)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in trained_params), name
    assert (result.steps, result.examples, ledger.steps) == (3, 18, 3) and math.isnan(result.loss)
    assert_no_opacus_traces(model)
    # The shared model can train again (another client, another round): no stale hooks.
    train_local_private(model, method, data, 2, 1e-2, ledger, seed=1, report_loss=True)
    assert ledger.steps == 5
    assert_no_opacus_traces(model)


def test_seeded_private_training_is_reproducible():
    results = []
    for _ in range(2):
        model, method, _ = setup("tiny-gpt2", "ffa")
        ledger = PrivacyLedger.create(target_epsilon=5.0, delta=DELTA, sample_rate=0.25, max_steps=6,
                                      max_grad_norm=1.0, num_examples=16)
        train_local_private(model, method, random_batch(2, size=16), 2, 1e-2, ledger, seed=7)
        results.append(extract_state(model, method.trained))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_empty_poisson_batches_take_noise_only_steps():
    model, method, _ = setup("tiny-bert", "fedsb")
    data = random_batch(4, size=10)
    # Sample rate 1e-4 over 10 examples: every Poisson batch of this seed is empty.
    ledger = PrivacyLedger(noise_multiplier=1.0, sample_rate=1e-4, delta=DELTA, target_epsilon=50.0,
                           max_grad_norm=1.0, num_examples=10)
    before = extract_state(model, method.trained)
    result = train_local_private(model, method, data, 3, 1e-2, ledger, seed=0, report_loss=True)
    assert ledger.steps == 3 and result.loss == 0.0
    after = extract_state(model, method.trained)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # the noise moved them
    # And directly: an empty batch in the middle of non-empty ones.
    with PrivateStepper(model, method, lr=1e-2, optimizer="sgd", noise_multiplier=1.0, max_grad_norm=1.0,
                        expected_batch_size=2.0) as stepper:
        stepper.step({k: v[:2] for k, v in data.items()})
        assert stepper.step({k: v[:0] for k, v in data.items()}) == 0.0
        stepper.step(None)
        stepper.step({k: v[2:5] for k, v in data.items()})
    assert_no_opacus_traces(model)


def test_a_trainable_tensor_that_stays_frozen_is_an_error():
    model, method, _ = setup("tiny-bert", "fedit")
    ledger = PrivacyLedger(noise_multiplier=1.0, sample_rate=0.5, delta=DELTA, target_epsilon=50.0,
                           max_grad_norm=1.0, num_examples=8)
    with pytest.raises(RuntimeError, match="unchanged"):  # lr 0: nothing can move
        train_local_private(model, method, random_batch(0, size=8), 1, 0.0, ledger, seed=0)
    assert_no_opacus_traces(model)


# --- the private Fed-SB init ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-gpt2"])
def test_private_init_without_clipping_or_noise_is_the_plain_gradient_sum(arch):
    model, method, targets = setup(arch, "fedsb")
    data = random_batch(6, size=6)
    # Sample rate 1 (num_samples >= n), no effective clipping, negligible noise.
    ledger = PrivacyLedger(noise_multiplier=1.0, sample_rate=0.5, delta=DELTA, target_epsilon=100.0,
                           max_grad_norm=1e6, num_examples=6, init_noise_multiplier=1e-12,
                           init_sample_rate=1.0)
    private = privatize_init_gradient(model, targets, data, 6, ledger, seed=0)
    plain = accumulate_gradients(model, targets, [data], 6)
    assert set(private) == set(plain)
    for name in plain:
        torch.testing.assert_close(private[name], plain[name], atol=1e-4, rtol=1e-4, msg=name)
    assert ledger.init_charged and ledger.epsilon() == pytest.approx(one_shot_rdp([(1e-12, 1.0, 1)], DELTA))
    assert_no_opacus_traces(model)


def test_private_init_clips_each_example_and_is_charged_once():
    model, method, targets = setup("tiny-bert", "fedsb")
    data = random_batch(7, size=8)
    clip = 1e-3
    ledger = PrivacyLedger(noise_multiplier=1.0, sample_rate=0.5, delta=DELTA, target_epsilon=100.0,
                           max_grad_norm=clip, num_examples=8, init_noise_multiplier=1e-12,
                           init_sample_rate=1.0)
    grads = privatize_init_gradient(model, targets, data, 8, ledger, seed=0)
    total = torch.cat([g.flatten() for g in grads.values()]).norm()
    assert 0 < total <= 8 * clip * (1 + 1e-4)
    with pytest.raises(ValueError, match="already charged"):
        privatize_init_gradient(model, targets, data, 8, ledger, seed=0)
    noisy = PrivacyLedger(noise_multiplier=1.0, sample_rate=0.5, delta=DELTA, target_epsilon=100.0,
                          max_grad_norm=1.0, num_examples=8, init_noise_multiplier=5.0, init_sample_rate=0.5)
    out = privatize_init_gradient(model, targets, data, 4, noisy, seed=0)
    assert noisy.epsilon() == pytest.approx(one_shot_rdp([(5.0, 0.5, 1)], DELTA))
    query, key = (next(v for k, v in out.items() if k.endswith(f"layer.0.attention.self.{m}"))
                  for m in ("query", "key"))
    assert query.shape == key.shape and (query - key).abs().min() > 0  # independent noise per module


# --- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"privacy.epsilon": 0}, "privacy.epsilon: got 0.0; accepted: a positive number"),
    ({"privacy.delta": 1.5}, "privacy.delta: got 1.5; accepted: a number in (0, 1) or null"),
    ({"privacy.max_grad_norm": 0}, "privacy.max_grad_norm: got 0.0; accepted: a positive number"),
    ({"privacy.accountant": "gdp"}, "privacy.accountant: got 'gdp'; accepted: one of 'rdp', 'prv'"),
    ({"privacy.init_noise_multiplier": -1}, "privacy.init_noise_multiplier: got -1.0"),
    ({"privacy.calibration_rounds": 9}, "privacy.calibration_rounds: got 9; accepted: null or an integer"),
    ({"privacy.enabled": True, "method.init.source": "pooled"},
     "method.init.source: got 'pooled'; accepted:"),
])
def test_privacy_config_errors_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_pooled_init_with_dp_only_when_allowed_and_then_labelled_not_private():
    base = {"privacy.enabled": True, "method.init.source": "pooled", "privacy.allow_pooled_init": True}
    assert privacy_status(load_config(None, base)).startswith("not private")
    assert privacy_status(load_config(None, {"privacy.enabled": True})) == "private"
    assert privacy_status(load_config()) == "off"
    # Pooled init without DP, or DP with another method, is not refused.
    load_config(None, {"method.init.source": "pooled"})
    load_config(None, {"privacy.enabled": True, "method.init.source": "pooled", "method.name": "ffa"})
