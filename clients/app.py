"""The Flower ClientApp: a virtual client trains its adapter on its own partition.

Each handler turns the message into plain tensors and calls the process's `fedsb` Worker,
which holds the one frozen base model shared by every virtual client of this process.
Between rounds a client keeps only its one-time tensors (LoRA-SB's B and A, FFA's A),
in its Flower `context.state`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsb.core.adapters import State
from fedsb.experiment.config import ExperimentConfig
from fedsb.experiment.prepared import assigned_partition
from fedsb.experiment.run_config import from_run_config
from fedsb.experiment.worker import Worker, get_worker, quiet_libraries
from fedsb.federation.protocol import (
    ADAPTER_RECORD,
    CONFIG_RECORD,
    GPU_PEAK_BYTES,
    INIT_GRADIENT_QUERY,
    INIT_RECORD,
    LEDGER_RECORD,
    METRICS_RECORD,
    NODE_RECORD,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    REFUSAL_RECORD,
    REFUSED,
    SERVER_ROUND,
    to_record,
    to_state,
)

if TYPE_CHECKING:
    from fedsb.training.privacy.accounting import PrivacyLedger

APP_DIR = Path(__file__).resolve().parents[1]
ONE_TIME_STATE = "fedsb.one-time"  # where a client keeps the tensors it receives once
LEDGER_STATE = "fedsb.privacy-ledger"  # its privacy ledger (JSON), with DP on

quiet_libraries()
app = ClientApp()


def _worker(context: Context) -> Worker:
    # Ray sets OMP_NUM_THREADS to the client's CPU resources; torch's setting is per process
    # and outlives this client on a reused actor, so set it on every call.
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    config = _config(tuple(sorted(context.run_config.items())))
    # num_clients 'auto': the federation's size, which each SuperNode knows as its num-partitions.
    # The run directory (named by fedsb run) may hold the server's prepared partition tokens.
    return get_worker(config.with_clients(int(context.node_config.get(NUM_PARTITIONS, 0)) or 1),
                      run_dir=str(context.run_config.get("run-dir", "")) or None)


@functools.lru_cache(maxsize=4)
def _config(run_config: tuple) -> ExperimentConfig:
    """Read and validate the experiment once per process and run, not once per message."""
    return from_run_config(dict(run_config), APP_DIR)


def _partition_id(context: Context) -> int:
    """The node's partition: its --node-config's, or in a simulation launched with
    assign-partitions, the one the server assigned to it (fedsb.experiment.prepared)."""
    if context.run_config.get("assign-partitions"):
        return assigned_partition(str(context.run_config["run-dir"]), context.node_id)
    if PARTITION_ID not in context.node_config:
        raise RuntimeError("this SuperNode has no partition-id: start it with "
                           "--node-config \"partition-id=I num-partitions=N\"")
    return int(context.node_config[PARTITION_ID])


def _local_state(message: Message, context: Context, worker: Worker) -> State:
    """The client's full adapter state: this round's download plus the one-time tensors."""
    if INIT_RECORD in message.content.array_records:
        context.state[ONE_TIME_STATE] = message.content[INIT_RECORD]
    state = to_state(message.content[ADAPTER_RECORD])
    if worker.method.sent_once:
        if ONE_TIME_STATE not in context.state.array_records:
            raise RuntimeError("the one-time tensors (init) are missing: they are sent with a client's first "
                               "training round")
        state.update(to_state(context.state[ONE_TIME_STATE]))
    return state


@app.query()
def describe(message: Message, context: Context) -> Message:
    """Which partition this node holds (node ids are random per run; partition ids are not)."""
    node = ConfigRecord({PARTITION_ID: _partition_id(context),
                         NUM_PARTITIONS: int(context.node_config.get(NUM_PARTITIONS, 0))})
    return Message(RecordDict({NODE_RECORD: node}), reply_to=message)


@contextmanager
def _ledger(context: Context, worker: Worker, message: Message | None = None
            ) -> Iterator[PrivacyLedger | None]:
    """The client's privacy ledger (None without DP), saved back to its state even if training fails,
    so every step taken stays charged. It lives in context.state: composed over the whole run; a
    resumed run's first message brings it back (LEDGER_RECORD) to the client's new process."""
    if not worker.config.privacy.enabled:
        yield None
        return
    from fedsb.experiment.privacy import ledger_for_client
    from fedsb.training.privacy.accounting import PrivacyLedger

    if LEDGER_STATE in context.state.config_records:
        ledger = PrivacyLedger.from_json(str(context.state[LEDGER_STATE]["json"]))
    elif message is not None and LEDGER_RECORD in message.content.config_records:
        ledger = PrivacyLedger.from_json(str(message.content[LEDGER_RECORD]["json"]))
    else:  # calibrated once, for the whole run
        ledger = ledger_for_client(worker.config, len(worker.client_tokens(_partition_id(context))["labels"]))
    try:
        yield ledger
    finally:
        context.state[LEDGER_STATE] = ConfigRecord({"json": ledger.to_json()})


@app.query(INIT_GRADIENT_QUERY)
def init_gradient(message: Message, context: Context) -> Message:
    """LoRA-SB init from the clients: this client's summed gradient of every target weight."""
    worker = _worker(context)
    with _ledger(context, worker) as ledger:
        gradients, num_examples = worker.client_gradients(_partition_id(context), ledger)
        metrics = {NUM_EXAMPLES: num_examples, **(ledger.metrics() if ledger else {})}
    content = RecordDict({INIT_RECORD: to_record(gradients), METRICS_RECORD: MetricRecord(metrics)})
    if ledger is not None:  # its init charge, for the server's checkpoints (as after training)
        content[LEDGER_RECORD] = ConfigRecord({"json": ledger.to_json()})
    return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    worker = _worker(context)
    server_round = int(message.content[CONFIG_RECORD][SERVER_ROUND])
    state = _local_state(message, context, worker)
    with _ledger(context, worker, message) as ledger:
        if ledger is not None and (reason := ledger.check_budget(worker.config.train.local_steps)):
            # The hard budget: refuse, say why, send no update.
            return Message(RecordDict({METRICS_RECORD: MetricRecord({REFUSED: 1, **ledger.metrics()}),
                                       REFUSAL_RECORD: ConfigRecord({"reason": reason}),
                                       LEDGER_RECORD: ConfigRecord({"json": ledger.to_json()})}),
                           reply_to=message)
        worker.peak_memory()  # start this client's measurement (the actor may have run another before)
        upload, result = worker.train_client(_partition_id(context), state, server_round, ledger)
    # The aggregation weight: the client's number of training examples (FedAvg), or 1 (uniform).
    weight = worker.aggregation_weight(_partition_id(context))
    metrics = {NUM_EXAMPLES: weight, "steps": result.steps, **(ledger.metrics() if ledger else {})}
    if (peak := worker.peak_memory()) is not None:
        metrics[GPU_PEAK_BYTES] = peak
    if math.isfinite(result.loss):  # DP training does not release its loss
        metrics["train-loss"] = result.loss
    content = RecordDict({ADAPTER_RECORD: to_record(upload), METRICS_RECORD: MetricRecord(metrics)})
    if ledger is not None:  # the server checkpoints it, to give it back after a resume
        content[LEDGER_RECORD] = ConfigRecord({"json": ledger.to_json()})
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    worker = _worker(context)
    metrics = worker.evaluate_client(_partition_id(context), _local_state(message, context, worker))
    metrics[NUM_EXAMPLES] = int(metrics.pop("examples"))
    return Message(RecordDict({METRICS_RECORD: MetricRecord(metrics)}), reply_to=message)
