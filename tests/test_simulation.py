"""The per-process Worker and the in-process federated loop, on a tiny model."""

from __future__ import annotations

import torch

from fedsb.experiment.cohort import sample_clients
from fedsb.experiment.config import load_config
from fedsb.experiment.worker import Worker

TINY = {"model.name": "tiny-bert", "model.max_length": 16, "data.num_examples": 200,
        "data.max_test_examples": 40, "federation.num_clients": 4, "federation.rounds": 2,
        "federation.clients_per_round": 2, "train.local_steps": 2, "method.init.num_samples": 8}


def test_cohorts_are_seeded_and_reproducible():
    ids = list(range(10))
    assert sample_clients(ids, 3, 0, 1) == sample_clients(list(reversed(ids)), 3, 0, 1)
    cohorts = {tuple(sample_clients(ids, 3, seed, 1)) for seed in range(5)}
    assert len(cohorts) > 1


def test_a_round_aggregates_the_client_uploads():
    config = load_config(None, {**TINY, "method.name": "fedsb"})
    worker = Worker(config)
    state = worker.initial_state()
    uploads = [worker.train_client(c, state, 1)[0] for c in (0, 1)]
    sizes = [len(worker.data.partitions[c]) for c in (0, 1)]
    assert sizes[0] != sizes[1]  # Dirichlet partitions of different sizes
    # FedAvg: weighted by each client's number of training examples.
    assert [worker.aggregation_weight(c) for c in (0, 1)] == sizes
    new = worker.method.aggregate(state, uploads, [worker.aggregation_weight(c) for c in (0, 1)])
    k = next(k for k in new if k.endswith("lora_R"))
    expected = (sizes[0] * uploads[0][k].double() + sizes[1] * uploads[1][k].double()) / sum(sizes)
    assert torch.allclose(new[k].double(), expected, atol=1e-7)
    assert not torch.allclose(new[k], (uploads[0][k] + uploads[1][k]) / 2, atol=1e-6)  # not the plain mean
    assert not torch.equal(new[k], state[k])
    # uniform: the plain mean (the Fed-SB authors').
    uniform = Worker(load_config(None, {**TINY, "method.name": "fedsb", "federation.weighting": "uniform"}))
    assert [uniform.aggregation_weight(c) for c in (0, 1)] == [1, 1]
    new = uniform.method.aggregate(state, uploads, [uniform.aggregation_weight(c) for c in (0, 1)])
    assert torch.allclose(new[k].double(), (uploads[0][k].double() + uploads[1][k].double()) / 2, atol=1e-7)


def test_fedsb_init_does_not_depend_on_what_the_worker_ran_before():
    config = load_config(None, {**TINY, "method.name": "fedsb"})
    worker = Worker(config)
    first = worker.initial_state()
    worker.train_client(0, first, 1)  # leaves trained adapters and head in the shared model
    again = worker.initial_state()
    for k in first:
        assert torch.allclose(first[k], again[k], atol=1e-6), k


def test_every_init_gradient_source_uses_the_same_lr_eff():
    """server, clients (and the private clients path, which only changes the gradient) all scale the
    first-update estimate by the config's init_lr: train.lr / (rounds x local steps)."""
    from fedsb.core.adapters import key
    from fedsb.core.init import lora_sb_init

    config = load_config(None, {**TINY, "method.name": "fedsb", "method.init.source": "clients"})
    assert config.init_lr == config.train.lr / (2 * 2)
    worker = Worker(config)
    gradients = [worker.client_gradients(c)[0] for c in range(4)]
    state = worker.initial_state(gradients)
    summed = {k: sum(g[k] for g in gradients) for k in gradients[0]}
    expected = lora_sb_init(summed, worker.method.rank, worker.method.scale, config.init_lr,
                            torch.Generator().manual_seed(config.seed))
    for name in worker.method.specs:
        r = key(name, "lora_R")
        assert torch.allclose(state[r], expected[r], rtol=1e-5, atol=0), name
