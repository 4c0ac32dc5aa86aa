"""Differential privacy through the Flower app (in-process grid, tiny BERT, 4 clients): every method
trains privately and writes its ledger; the ledger's epsilon is the composed one; the budget guard
refuses a round and the run goes on; the server refuses a client that reports an overspend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import MessageType
from opacus.accountants import RDPAccountant

from fedsb.experiment.config import ConfigError
from fedsb.experiment.summary import read_metrics
from fedsb.federation.inprocess import run_in_process
from fedsb.federation.protocol import METRICS_RECORD
from fedsb.methods import METHODS

TINY = "tests/configs/tiny.yaml"


def metric_dicts(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows as written (through the typed reader, which checks the schema)."""
    return [row.to_dict() for row in read_metrics(run_dir)]
TARGET = 3.0


def private_run(run_dir: Path, method: str, overrides: str = "", tamper=None):
    rc = {"config": TINY, "run-dir": str(run_dir), "method": method, "privacy-epsilon": TARGET,
          "overrides": overrides}
    grid, run = run_in_process(rc, 4, tamper=tamper)
    return grid, run


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_privately_and_writes_the_ledger(tmp_path, method):
    grid, run = private_run(tmp_path, method)
    first = next(m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN)
    rows = metric_dicts(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())["privacy"]
    for row in rows[1:]:
        assert row["accepted"] == [0, 1, 2, 3]
        assert 0 < row["epsilon_mean"] <= row["epsilon_max"] <= row["epsilon_max_all"] <= TARGET
        assert row["train_loss"] is None  # DP training does not release its loss
    assert rows[1]["epsilon_max"] < rows[2]["epsilon_max"]  # composition: round 2 spends more
    assert summary["enabled"] and summary["status"] == "private"
    assert summary["epsilon_max"] == rows[-1]["epsilon_max_all"]
    assert sorted(summary["per_client"]) == ["0", "1", "2", "3"]
    for ledger in summary["per_client"].values():
        assert ledger["dp_steps"] == 2 * 2  # 2 rounds x 2 local steps, all charged
        assert ledger["delta"] < 1 / 50 and ledger["noise_multiplier"] > 0 and ledger["max_grad_norm"] == 1.0
    # The private steps moved the trained tensors.
    from fedsb.federation.protocol import ADAPTER_RECORD, to_state

    before = to_state(first.content[ADAPTER_RECORD])
    moved = [k for k in run.strategy.method.upload(run.strategy.global_state)
             if not torch.equal(run.strategy.global_state[k], before[k])]
    assert moved == list(run.strategy.method.upload(run.strategy.global_state))


@pytest.mark.slow
def test_reported_epsilon_is_the_one_shot_composition_of_every_step(tmp_path):
    _, run = private_run(tmp_path, "fedit", "federation.rounds=3")
    for ledger in run.privacy.ledgers.values():
        accountant = RDPAccountant()  # an independent accountant stepped once for the whole run
        accountant.history = [(ledger["noise_multiplier"], ledger["sample_rate"], int(ledger["dp_steps"]))]
        assert ledger["dp_steps"] == 3 * 2
        assert ledger["epsilon"] == pytest.approx(accountant.get_epsilon(ledger["delta"]), rel=1e-9)
        assert ledger["epsilon"] <= TARGET


def test_budget_guard_refuses_a_round_and_the_run_goes_on(tmp_path):
    # Noise calibrated for one round of local steps: a client sampled a second time must refuse.
    overrides = "federation.clients_per_round=0.5; federation.rounds=3; privacy.calibration_rounds=1"
    _, run = private_run(tmp_path, "fedsb", overrides)
    refused = {pid for r in run.strategy.rounds.values() for pid in r.refused}
    assert refused
    trained_before = set()
    for server_round in sorted(run.strategy.rounds):
        r = run.strategy.rounds[server_round]
        assert set(r.refused) == set(r.cohort) & trained_before  # exactly the second-timers refuse
        assert all("privacy budget" in reason for reason in r.refused.values())
        assert not set(r.refused) & set(r.accepted)
        trained_before |= set(r.accepted)
    rows = metric_dicts(tmp_path)
    assert len(rows) == 4 and all(row.get("epsilon_max_all", 0) <= TARGET for row in rows)


def test_server_refuses_a_client_that_reports_epsilon_above_the_target(tmp_path):
    def overspend(client, reply):
        if client == 2 and reply.metadata.message_type == MessageType.TRAIN and reply.has_content():
            reply.content[METRICS_RECORD]["epsilon"] = TARGET + 0.5
        return reply

    _, run = private_run(tmp_path, "ffa", "federation.rounds=1", tamper=overspend)
    assert "above the target" in run.strategy.rounds[1].rejected[2]
    assert run.strategy.rounds[1].accepted == [0, 1, 3]
    summary = json.loads((tmp_path / "summary.json").read_text())["privacy"]
    assert summary["epsilon_max"] <= TARGET and "2" not in summary["per_client"]


def test_pooled_init_under_dp_is_refused_unless_allowed_and_then_labelled(tmp_path):
    with pytest.raises(ConfigError, match="^method.init.source: got 'pooled'"):
        private_run(tmp_path / "a", "fedsb", "method.init.source=pooled")
    private_run(tmp_path / "b", "fedsb",
                "method.init.source=pooled; privacy.allow_pooled_init=true; federation.rounds=1")
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["oracle"] is True and summary["privacy"]["status"].startswith("not private")
