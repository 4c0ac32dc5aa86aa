"""Client failures and malformed updates, through the real apps (in-process grid, tiny BERT): every
kind of bad update is rejected with its reason (log and metrics.jsonl) and a hash of the global state
before and after the round proves it untouched; failing and silent clients are recorded and the round
goes on with the others; too few valid updates skip the round, and too many skipped rounds stop the run."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from fedsb.experiment.checkpoint import load_checkpoint
from fedsb.experiment.run_config import from_run_config
from fedsb.experiment.worker import get_worker
from fedsb.federation.inprocess import run_in_process
from fedsb.federation.protocol import ADAPTER_RECORD, METRICS_RECORD, NUM_EXAMPLES, to_record, to_state
from server.app import APP_DIR
from server.strategy import RunStopped

TINY = "tests/configs/tiny.yaml"


def state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for k in sorted(state):
        digest.update(k.encode())
        digest.update(state[k].detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def forge_upload(change):
    """A tamper that rewrites every training reply's upload with `change(upload) -> upload`."""
    def tamper(pid, reply):
        if reply.has_error() or reply.metadata.message_type != "train":
            return reply
        upload = change(to_state(reply.content[ADAPTER_RECORD]))
        metrics = reply.content[METRICS_RECORD]
        reply.content = RecordDict({ADAPTER_RECORD: to_record(upload), METRICS_RECORD: metrics})
        return reply
    return tamper


def forge_metrics(change):
    def tamper(pid, reply):
        if reply.has_error() or reply.metadata.message_type != "train":
            return reply
        metrics = dict(reply.content[METRICS_RECORD])
        change(metrics)
        records = {ADAPTER_RECORD: reply.content[ADAPTER_RECORD]}
        if metrics is not None:
            records[METRICS_RECORD] = MetricRecord(metrics)
        reply.content = RecordDict(records)
        return reply
    return tamper


def _first(upload):
    return next(iter(sorted(upload)))


def _set(upload, value):
    k = _first(upload)
    upload[k] = torch.full_like(upload[k], value)
    return upload


def _drop_metrics(pid, reply):
    if reply.has_error() or reply.metadata.message_type != "train":
        return reply
    reply.content = RecordDict({ADAPTER_RECORD: reply.content[ADAPTER_RECORD]})
    return reply


def _unasked(pid, reply):
    """The reply comes back from a node that was not sampled this round (cohort: 2 of 4)."""
    if reply.metadata.message_type == "train":
        reply.metadata.__dict__["_src_node_id"] = 987654321
    return reply


MALFORMED = [  # (name, tamper, overrides, reason in every client's rejection)
    ("nan", forge_upload(lambda u: _set(u, math.nan)), "", "not finite"),
    ("+inf", forge_upload(lambda u: _set(u, math.inf)), "", "not finite"),
    ("-inf", forge_upload(lambda u: _set(u, -math.inf)), "", "not finite"),
    ("shape", forge_upload(lambda u: {**u, _first(u): torch.zeros(3, 3)}), "", "shape"),
    ("dtype", forge_upload(lambda u: {**u, _first(u): u[_first(u)].double()}), "", "dtype"),
    ("missing key", forge_upload(lambda u: {k: v for k, v in u.items() if k != _first(u)}), "", "missing"),
    ("unexpected key", forge_upload(lambda u: {**u, "bert.pooler.dense.lora_A": torch.zeros(2, 2)}), "",
     "unexpected"),
    ("no metrics", _drop_metrics, "", "needs the records"),
    ("zero examples", forge_metrics(lambda m: m.update({NUM_EXAMPLES: 0})), "", "positive integer"),
    ("negative examples", forge_metrics(lambda m: m.update({NUM_EXAMPLES: -3})), "", "positive integer"),
    ("fractional examples", forge_metrics(lambda m: m.update({NUM_EXAMPLES: 2.5})), "", "positive integer"),
    ("norm above the bound", None, "federation.max_update_norm=1e-9", "exceeds federation.max_update_norm"),
    ("epsilon above the target", forge_metrics(lambda m: m.update(epsilon=99.0)), "privacy.enabled=true; "
     "privacy.epsilon=3", "above the target"),
]


@pytest.mark.parametrize(("name", "tamper", "overrides", "reason"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_every_malformed_update_is_rejected_and_the_global_state_is_untouched(
        tmp_path, name, tamper, overrides, reason):
    rc = {"config": TINY, "run-dir": str(tmp_path), "method": "fedit",
          "overrides": "; ".join(p for p in ("federation.rounds=1", overrides) if p)}
    before = state_hash(get_worker(from_run_config(rc, APP_DIR)).initial_state())
    _, run = run_in_process(rc, tamper=tamper)
    log = run.strategy.rounds[1]
    assert sorted(log.rejected) == [0, 1, 2, 3], log.rejected
    assert all(reason in r for r in log.rejected.values()), log.rejected
    assert log.accepted == [] and log.skipped
    assert state_hash(run.strategy.global_state) == before  # untouched
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    assert sorted(row["rejected"]) == ["0", "1", "2", "3"] and reason in row["rejected"]["2"]
    assert row["skipped"] is True and row["accepted"] == []


def test_a_reply_from_a_node_that_was_not_asked_is_rejected(tmp_path):
    rc = {"config": TINY, "run-dir": str(tmp_path), "method": "fedit",
          "overrides": "federation.rounds=1; federation.clients_per_round=0.5; federation.round_timeout_s=2"}
    before = state_hash(get_worker(from_run_config(rc, APP_DIR)).initial_state())
    _, run = run_in_process(rc, tamper=_unasked)
    log = run.strategy.rounds[1]
    assert log.rejected == {"node 987654321": "a reply from a node that was not asked this round"}
    assert sorted(log.failed) == log.cohort and log.accepted == []  # the asked ones never answered
    assert state_hash(run.strategy.global_state) == before


def _unreachable(pid, reply):
    """Client 1's node is gone: the SuperLink answers its message with an error, from its own node id."""
    from flwr.app import Error, Message
    from flwr.common.constant import SUPERLINK_NODE_ID

    if pid != 1 or reply.metadata.message_type != "train":
        return reply
    error = Message(Error(code=3, reason="the SuperNode is offline"), reply_to=reply)
    error.metadata.__dict__["_reply_to_message_id"] = reply.metadata.reply_to_message_id
    error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    return error


def test_the_superlinks_error_for_an_unreachable_node_fails_that_client(tmp_path):
    """The error reply comes from the SuperLink's node id, in reply to client 1's message: client 1 is
    recorded as failed with the SuperLink's reason (not 'node 1 was not asked'), the others aggregate."""
    rc = {"config": TINY, "run-dir": str(tmp_path), "method": "fedit",
          "overrides": "federation.rounds=1; federation.clients_per_round=1.0"}
    _, run = run_in_process(rc, tamper=_unreachable)
    log = run.strategy.rounds[1]
    assert log.rejected == {}
    assert list(log.failed) == [1] and "the SuperNode is offline" in log.failed[1]
    assert log.accepted == [p for p in log.cohort if p != 1]


@pytest.mark.slow
def test_failing_and_silent_clients_are_recorded_and_the_round_goes_on(tmp_path, monkeypatch):
    from fedsb.experiment.worker import Worker

    train_client = Worker.train_client

    def failing(self, partition_id, *args, **kwargs):  # client 1's training raises
        if partition_id == 1:
            raise RuntimeError("CUDA out of memory")
        return train_client(self, partition_id, *args, **kwargs)

    monkeypatch.setattr(Worker, "train_client", failing)

    def tamper(pid, reply):  # client 2 never answers
        return None if pid == 2 and reply.metadata.message_type == "train" else reply

    # The in-process grid trains the answering clients within the round's timeout, one after the
    # other: 10 s leaves them time on a loaded machine, and client 2's silence still expires.
    overrides = "federation.rounds=1; federation.round_timeout_s=10"
    _, run = run_in_process({"config": TINY, "run-dir": str(tmp_path), "overrides": overrides}, tamper=tamper)
    log = run.strategy.rounds[1]
    assert log.failed == {1: "the client failed: RuntimeError: CUDA out of memory",
                          2: "no reply within federation.round_timeout_s"}
    assert log.accepted == [0, 3] and not log.skipped
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    assert row["failed"] == {"1": "the client failed: RuntimeError: CUDA out of memory",
                             "2": "no reply within federation.round_timeout_s"}


def test_too_many_rounds_without_enough_updates_stop_the_run_with_a_checkpoint(tmp_path):
    def only_one(pid, reply):  # one valid update per round, two needed
        return None if reply.metadata.message_type == "train" and pid != 0 else reply

    overrides = ("federation.rounds=4; federation.min_clients=2; federation.max_failed_rounds=2; "
                 "federation.round_timeout_s=1")
    with pytest.raises(RunStopped, match=r"2 rounds in a row without 2 valid updates .* after round 1, "
                                         "resumable with fedsb run --resume"):
        run_in_process({"config": TINY, "run-dir": str(tmp_path), "overrides": overrides}, tamper=only_one)
    checkpoint, _, _ = load_checkpoint(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert checkpoint.round == 1 and rows[1]["skipped"] is True
