"""The message protocol shared by the ServerApp (server/) and the ClientApp (clients/): message types,
record and metric names, Flower records <-> fedsb's plain tensor states, and metering of what a
message carries. Both apps import these names; neither spells a record name itself.

    query                 server -> node: which partition do you hold?  reply: NODE_RECORD
    query.init_gradient   server -> client: your summed init gradient   reply: INIT_RECORD, METRICS_RECORD
    train                 CONFIG_RECORD, ADAPTER_RECORD (+ INIT_RECORD the first time)
                          reply: ADAPTER_RECORD, METRICS_RECORD; or METRICS_RECORD with REFUSED=1
                          and REFUSAL_RECORD (a client whose privacy budget would be exceeded)
    evaluate              CONFIG_RECORD, ADAPTER_RECORD            reply: METRICS_RECORD
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedsb.core.adapters import State, component_of
from fedsb.experiment.meter import INIT, Meter

INIT_GRADIENT_QUERY = "init_gradient"  # the query's name: message type f"{MessageType.QUERY}.init_gradient"
CONFIG_RECORD = "config"  # in it: SERVER_ROUND
SERVER_ROUND = "server-round"
NODE_RECORD = "node"  # a node's PARTITION_ID and NUM_PARTITIONS
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
REFUSAL_RECORD = "refusal"  # in it: "reason"
# With DP: a client's whole privacy ledger (JSON, in "json"), up in every reply so the server can
# checkpoint it, and down once after a resume, so a client's new process goes on with it.
LEDGER_RECORD = "ledger"
ADAPTER_RECORD = "arrays"  # the per-round tensors of a message
INIT_RECORD = "init"  # one-time tensors: LoRA-SB's B and A down, a client's init gradient up
METRICS_RECORD = "metrics"  # a reply's MetricRecord
NUM_EXAMPLES = "num-examples"  # in it: the aggregation weight
GPU_PEAK_BYTES = "gpu-peak-bytes"  # in it, on a GPU: the client's peak memory while it trained
REFUSED = "refused"  # in it: 1 when a client refused to train (its privacy budget)
# With DP, a reply's metrics also carry the client's privacy ledger:
LEDGER_KEYS = ("epsilon", "delta", "target_epsilon", "noise_multiplier", "max_grad_norm", "sample_rate",
               "dp_steps")


def to_record(state: State) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in state.items()})


def to_state(record: ArrayRecord) -> State:
    return {k: torch.from_numpy(array.numpy().copy()) for k, array in record.items()}


def meter_message(meter: Meter, content: RecordDict, *, round: int, client: int, phase: str,
                  direction: str) -> None:
    """Record every array of a message's content: one meter entry per component.

    The component is the state key's (lora_A, lora_B, lora_R, residual, head), except in the
    `init` record, whose tensors are all one-time `init` traffic.
    """
    sizes: dict[str, list[int]] = {}
    for record_name, record in content.array_records.items():
        for k, array in record.items():
            component = INIT if record_name == INIT_RECORD else component_of(k)
            numel = int(np.prod(array.shape))
            itemsize = np.dtype(array.dtype).itemsize
            # wire bytes as ArrayRecord.count_bytes() counts them: serialised array + key
            entry = sizes.setdefault(component, [0, 0, 0])
            entry[0] += numel
            entry[1] += numel * itemsize
            entry[2] += len(array.data) + len(k)
    for component, (params, nbytes, wire) in sizes.items():
        meter.record(round, client, phase, direction, component, params, nbytes, wire)
