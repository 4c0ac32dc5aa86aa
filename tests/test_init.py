"""LoRA, FFA-LoRA and LoRA-SB initialisations (docs/architecture.md section 3)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_batch

from fedsb.core.adapters import ModuleSpec, inject_adapters, target_specs
from fedsb.core.init import (
    accumulate_gradients,
    ffa_init,
    first_update_estimate,
    lora_init,
    lora_sb_init,
    truncated_svd,
)
from fedsb.core.models import find_target_modules, load_model

SPECS = {"a": ModuleSpec("a", 24, 40, False), "b": ModuleSpec("b", 40, 24, True)}


def test_lora_init_is_kaiming_uniform_a_and_zero_b():
    state = lora_init(SPECS, 4, torch.Generator().manual_seed(0))
    a = state["a.lora_A"]
    assert a.shape == (4, 40) and state["a.lora_B"].shape == (24, 4)
    assert a.abs().max() <= 1 / math.sqrt(40) and a.abs().max() > 0.9 / math.sqrt(40)
    assert torch.count_nonzero(state["a.lora_B"]) == 0


def test_ffa_init_is_shared_through_the_seed():
    one, two = ffa_init(SPECS, 4, seed=7), ffa_init(SPECS, 4, seed=7)
    assert torch.equal(one["b.lora_A"], two["b.lora_A"])
    assert not torch.equal(one["b.lora_A"], ffa_init(SPECS, 4, seed=8)["b.lora_A"])


def test_inits_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    gradients = {"a": torch.randn(24, 40, generator=torch.Generator().manual_seed(1))}
    lora_init(SPECS, 4, torch.Generator().manual_seed(0))
    ffa_init(SPECS, 4, seed=3)
    lora_sb_init(gradients, 4, 1.0, 1e-3, torch.Generator().manual_seed(0), randomized=True)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_lora_sb_init_is_the_best_rank_r_approximation_of_the_scaled_sign(scale):
    g = torch.Generator().manual_seed(0)
    gradients = {"m": torch.randn(24, 40, generator=g)}
    rank, lr = 5, 3e-4
    state = lora_sb_init(gradients, rank, scale, lr, g)
    b, r0, a = state["m.lora_B"], state["m.lora_R"], state["m.lora_A"]
    assert b.shape == (24, rank) and r0.shape == (rank, rank) and a.shape == (rank, 40)
    eye = torch.eye(rank)
    assert torch.allclose(b.T @ b, eye, atol=1e-5)  # orthonormal columns
    assert torch.allclose(a @ a.T, eye, atol=1e-5)  # orthonormal rows
    assert torch.count_nonzero(r0 - torch.diag(torch.diagonal(r0))) == 0  # R0 = diag(S_r) / s

    target = -lr * torch.sign(gradients["m"]).double()
    u, s, vh = torch.linalg.svd(target)
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]  # Eckart-Young
    init = scale * b.double() @ r0.double() @ a.double()
    assert ((init - best).norm() / best.norm()).item() < 1e-5
    # ...and its error is exactly the tail of the spectrum.
    assert math.isclose((target - init).norm().item(), s[rank:].norm().item(), rel_tol=1e-4)


def test_randomized_svd_matches_the_exact_one_on_a_large_module():
    g = torch.Generator().manual_seed(0)
    # Real gradients are dominated by a few directions (plus noise), and so is their sign.
    low_rank = torch.randn(1100, 8, generator=g) @ torch.randn(8, 1030, generator=g)
    gradient = low_rank + 0.5 * torch.randn(1100, 1030, generator=g)
    matrix = first_update_estimate(gradient, 1e-3)
    u, s, vh = truncated_svd(matrix, 8, torch.Generator().manual_seed(1))  # randomized: min dim >= 1024
    u_exact, s_exact, vh_exact = torch.linalg.svd(matrix.double(), full_matrices=False)
    assert torch.allclose(s.double(), s_exact[:8], rtol=1e-3)
    assert torch.allclose(u.T @ u, torch.eye(8), atol=1e-4)
    error = (matrix.double() - u.double() @ torch.diag(s.double()) @ vh.double()).norm()
    assert error.item() <= 1.001 * s_exact[8:].norm().item()  # as good as the optimal rank-8 error


def test_rank_above_the_module_size_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        truncated_svd(torch.randn(6, 4), 5, torch.Generator())


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-gpt2"])
def test_accumulated_gradient_is_the_per_sample_sum_in_out_by_in_layout(arch):
    model = load_model(arch, num_labels=3)
    targets = find_target_modules(model)[:3]
    batch = random_batch(0, size=6)
    grads = accumulate_gradients(model, targets, [batch, batch], num_samples=9)  # 6 + 3 examples
    # Independent computation: per-sample losses summed, via plain autograd.
    name = targets[0]
    weight = model.get_submodule(name).weight
    weight.requires_grad_(True)
    loss = sum(model(**{k: v[i:i + 1] for k, v in batch.items()}).loss for i in range(6))
    loss = loss + sum(model(**{k: v[i:i + 1] for k, v in batch.items()}).loss for i in range(3))
    (expected,) = torch.autograd.grad(loss, weight)
    weight.requires_grad_(False)
    spec = target_specs(model, [name])[name]
    expected = expected.T if spec.conv1d else expected
    assert grads[name].shape == (spec.out_features, spec.in_features)
    assert torch.allclose(grads[name], expected, atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in model.parameters())


def test_gradient_through_zero_adapters_equals_the_plain_model_gradient():
    plain = load_model("tiny-llama", num_labels=3)
    targets = find_target_modules(plain)
    adapted = load_model("tiny-llama", num_labels=3)
    inject_adapters(adapted, targets, 4, 4.0, "lora_sb")
    batch = random_batch(1)
    g_plain = accumulate_gradients(plain, targets, [batch], 8)
    g_adapted = accumulate_gradients(adapted, targets, [batch], 8)
    for name in targets:
        assert torch.allclose(g_plain[name], g_adapted[name], atol=1e-6)


def test_the_default_lora_sb_init_leaves_the_packaged_minilm_almost_unchanged():
    """At the authors' scale (lr_eff = train.lr / a client's steps in the run), s B R0 A is a small
    perturbation of each pretrained weight (fedsb's earlier default, lr_eff = train.lr, gave a
    median of 6e-2 and scrambled the [CLS] features before round 1); and R0 is linear in lr_eff."""
    from pathlib import Path

    from fedsb.core.adapters import key
    from fedsb.core.init import lora_sb_init
    from fedsb.experiment.config import load_config
    from fedsb.experiment.worker import Worker

    config = load_config(Path(__file__).resolve().parents[1] / "configs/default.yaml")
    steps = config.federation.rounds * config.train.local_steps
    assert config.init_lr == pytest.approx(config.train.lr / steps)
    worker = Worker(config)
    state = worker.initial_state()
    ratios = []
    for name, delta in worker.method.effective_delta(state).items():
        weight = worker.model.get_submodule(name).base.weight
        ratios.append(float(delta.norm() / weight.norm()))
    median = sorted(ratios)[len(ratios) // 2]
    print(f"||s B R0 A|| / ||W0|| over {len(ratios)} modules: median {median:.2e}, max {max(ratios):.2e}")
    assert len(ratios) == 36 and median < 1e-2 and max(ratios) < 1e-2

    gradients = worker._gradients(worker.tokens(worker.data.server), config.method.init.num_samples)
    name = next(iter(gradients))
    one = lora_sb_init({name: gradients[name]}, 16, 1.0, 1e-4, torch.Generator().manual_seed(0))
    three = lora_sb_init({name: gradients[name]}, 16, 1.0, 3e-4, torch.Generator().manual_seed(0))
    r = key(name, "lora_R")
    assert torch.allclose(three[r], 3 * one[r], rtol=1e-5, atol=0)
    assert torch.equal(three[key(name, "lora_B")], one[key(name, "lora_B")])
