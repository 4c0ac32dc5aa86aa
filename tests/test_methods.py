"""One conformance suite run against every method on every tiny architecture (docs/architecture.md section 2).

Clients really train (a few AdamW steps on their own random batches) before their uploads
are aggregated, so the invariants are checked on realistic, distinct client states.
"""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_LABELS, random_batch

from fedsb.core.adapters import (
    HEAD,
    component_of,
    effective_weights,
    extract_state,
    frozen_base_parameters,
    load_state,
    merge_adapters,
)
from fedsb.core.init import accumulate_gradients
from fedsb.core.models import find_target_modules, load_model
from fedsb.methods import METHODS, InvalidUpdate, build_method, get_method
from fedsb.training.local import train_local

RANK, ALPHA = 4, 8.0
CLIENT_WEIGHTS = (10.0, 30.0, 60.0)  # numbers of examples; normalised to 0.1, 0.3, 0.6
EXACT = tuple(name for name in METHODS if get_method(name).exact)  # as each method declares it


def setup(arch: str, method_name: str, dtype: torch.dtype = torch.float32):
    """A tiny model with the method's adapters and the method's global initial state loaded."""
    model = load_model(arch, num_labels=NUM_LABELS, seed=0, dtype=dtype)
    targets = find_target_modules(model)
    method = build_method(method_name, model, targets, RANK, ALPHA)
    gradients = None
    if method.init_gradients:  # as the method declares (Fed-SB's LoRA-SB init)
        gradients = accumulate_gradients(model, targets, [random_batch(99)], num_samples=8)
    state = method.initial_state(model, torch.Generator().manual_seed(0), gradients, lr_eff=1e-3)
    load_state(model, state)
    return model, method, state


def train_clients(model, method, global_state, steps: int = 3):
    """Each client loads the global state, trains on its own data; returns uploads and eff. weights."""
    uploads, weights = [], []
    for client in range(len(CLIENT_WEIGHTS)):
        load_state(model, global_state)
        train_local(model, method, [random_batch(client)], steps=steps, lr=1e-2)
        local = extract_state(model)
        uploads.append(method.upload(local))
        weights.append(effective_weights(model))
    return uploads, weights


def weighted_mean_weights(per_client):
    w = torch.tensor(CLIENT_WEIGHTS, dtype=torch.float64)
    w = w / w.sum()
    return {name: sum(wi * c[name].double() for wi, c in zip(w, per_client, strict=True)).float()
            for name in per_client[0]}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_targets_include_non_square_modules(arch):
    model, method, _ = setup(arch, "fedsb")
    shapes = {(s.out_features, s.in_features) for s in method.specs.values()}
    assert any(m != n for m, n in shapes), shapes


@pytest.mark.parametrize("method_name", EXACT)
def test_aggregation_is_exact(arch, method_name):
    model, method, global_state = setup(arch, method_name)
    uploads, client_weights = train_clients(model, method, global_state)
    new_state = method.aggregate(global_state, uploads, CLIENT_WEIGHTS)
    load_state(model, new_state)
    aggregated = effective_weights(model)
    expected = weighted_mean_weights(client_weights)
    for name, spec in method.specs.items():
        assert rel_err(aggregated[name], expected[name]) < 1e-5, (name, spec)
    # The clients really diverged: otherwise exactness would be trivial.
    some = next(iter(method.specs))
    assert rel_err(client_weights[0][some], client_weights[2][some]) > 1e-7


@pytest.mark.parametrize("method_name", EXACT)
def test_aggregation_is_exact_over_a_bfloat16_base(method_name):
    """model.dtype=bfloat16: the frozen base is bfloat16, while the adapters, the head, the upload
    and the aggregation stay float32, so exact methods stay exact (tiny Llama)."""
    model, method, global_state = setup("tiny-llama", method_name, dtype=torch.bfloat16)
    layer = model.get_submodule(next(iter(method.specs)))
    assert layer.base.weight.dtype == torch.bfloat16
    assert all(layer.component(c).dtype == torch.float32 for c in layer.held())
    assert all(v.dtype == torch.float32 for v in global_state.values())
    uploads, client_weights = train_clients(model, method, global_state)
    assert all(v.dtype == torch.float32 for u in uploads for v in u.values())
    new_state = method.aggregate(global_state, uploads, CLIENT_WEIGHTS)
    load_state(model, new_state)
    aggregated = effective_weights(model)
    expected = weighted_mean_weights(client_weights)
    for name in method.specs:
        assert rel_err(aggregated[name], expected[name]) < 1e-5, name
    some = next(iter(method.specs))
    assert rel_err(client_weights[0][some], client_weights[2][some]) > 1e-7


def test_fedit_gap_equals_fedex_residual(arch):
    model, fedit, global_state = setup(arch, "fedit")
    uploads, client_weights = train_clients(model, fedit, global_state)
    new_state = fedit.aggregate(global_state, uploads, CLIENT_WEIGHTS)
    load_state(model, new_state)
    aggregated = effective_weights(model)
    expected = weighted_mean_weights(client_weights)

    fedex = get_method("fedex")(fedit.specs, RANK, ALPHA)
    fedex_global = {**global_state, **{f"{n}.residual": torch.zeros(s.weight_layout)
                                        for n, s in fedit.specs.items()}}
    fedex_state = fedex.aggregate(fedex_global, uploads, CLIENT_WEIGHTS)
    for name, spec in fedit.specs.items():
        residual = fedex_state[f"{name}.residual"]
        assert tuple(residual.shape) == spec.weight_layout  # kept in the base weight's own layout
        residual = residual.T if spec.conv1d else residual
        gap = expected[name] - aggregated[name]
        assert gap.norm() > 0  # FedIT really is inexact here
        assert rel_err(residual, gap) < 1e-4, name


def test_identical_clients_aggregate_to_their_state(arch, method_name):
    model, method, global_state = setup(arch, method_name)
    load_state(model, global_state)
    train_local(model, method, [random_batch(5)], steps=2, lr=1e-2)
    local = extract_state(model)
    upload = method.upload(local)
    new_state = method.aggregate(global_state, [upload] * 3, CLIENT_WEIGHTS)
    for k, value in local.items():
        assert torch.allclose(new_state[k], value, atol=1e-6, rtol=1e-5), k


def test_local_steps_change_every_trainable_and_no_frozen_tensor(arch, method_name):
    model, method, global_state = setup(arch, method_name)
    base_before = {n: p.detach().clone() for n, p in frozen_base_parameters(model).items()}
    assert base_before and not any(n.startswith(("classifier", "score")) for n in base_before)
    # Two steps: with LoRA's B = 0, A's gradient is zero in the very first step.
    train_local(model, method, [random_batch(1)], steps=2, lr=1e-2)
    after = extract_state(model)
    for k, before in global_state.items():
        changed = not torch.equal(after[k], before)
        assert changed == (component_of(k) in method.trained), (k, changed)
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
            assert not p.requires_grad


def test_round_trip_extract_load_is_identity(arch, method_name):
    model, method, global_state = setup(arch, method_name)
    train_local(model, method, [random_batch(2)], steps=2, lr=1e-2)
    trained = extract_state(model)
    batch = random_batch(3)
    logits = model(**batch).logits

    other, other_method, _ = setup(arch, method_name)
    load_state(other, trained)
    again = extract_state(other)
    assert set(again) == set(trained)
    for k in trained:
        assert torch.equal(again[k], trained[k]), k
    assert torch.allclose(other(**batch).logits, logits, atol=1e-6)


def test_merge_matches_adapter_forward(arch, method_name):
    model, method, _ = setup(arch, method_name)
    train_local(model, method, [random_batch(2)], steps=2, lr=1e-2)
    batch = random_batch(4)
    with torch.no_grad():
        logits = model(**batch).logits
        merge_adapters(model)
        merged = model(**batch).logits
    assert torch.allclose(merged, logits, atol=1e-5)


def test_download_sends_one_time_tensors_once(method_name):
    model, method, state = setup("tiny-bert", method_name)
    first, later = method.download(state, first_time=True), method.download(state, first_time=False)
    assert set(first) == set(state)
    assert {component_of(k) for k in set(first) - set(later)} == set(method.one_time)


def test_upload_holds_exactly_the_trained_components(method_name):
    model, method, state = setup("tiny-bert", method_name)
    upload = method.upload(state)
    assert {component_of(k) for k in upload} == set(method.trainable) | {HEAD}


def test_bad_uploads_are_rejected(method_name):
    model, method, state = setup("tiny-llama", method_name)
    good = method.upload(state)
    method.validate_upload(good, state)
    k = next(iter(good))
    with pytest.raises(InvalidUpdate, match="missing"):
        method.validate_upload({kk: v for kk, v in good.items() if kk != k}, state)
    with pytest.raises(InvalidUpdate, match="shape"):
        method.validate_upload({**good, k: torch.zeros(7, 7)}, state)
    with pytest.raises(InvalidUpdate, match="finite"):
        method.validate_upload({**good, k: torch.full_like(good[k], float("nan"))}, state)
    with pytest.raises(InvalidUpdate, match="unexpected"):
        method.validate_upload({**good, "bert.embeddings.word_embeddings.weight": torch.zeros(1)}, state)


def test_weights_are_normalised_by_examples():
    model, method, state = setup("tiny-bert", "fedit")
    ups = [{k: torch.full_like(v, float(i)) for k, v in method.upload(state).items()} for i in range(3)]
    new = method.aggregate(state, ups, (10, 30, 60))  # expected 0*0.1 + 1*0.3 + 2*0.6 = 1.5
    k = next(iter(method.upload(state)))
    assert torch.allclose(new[k], torch.full_like(new[k], 1.5))
    with pytest.raises(ValueError, match="positive sum"):
        method.aggregate(state, ups, (0, 0, 0))


def test_registry_names_every_method():
    assert set(METHODS) == {"fedit", "ffa", "fedex", "fedsb", "bone", "mora"}
    assert set(EXACT) == {"ffa", "fedex", "fedsb", "bone", "mora"}  # FedIT alone averages inexactly
    with pytest.raises(ValueError, match="accepted: fedit, ffa, fedex, fedsb"):
        get_method("fedavg")
