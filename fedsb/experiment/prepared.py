"""What the server prepares once for the client processes of its machine: every client's tokenised
partition, and the frozen base weights, shared by memory mapping.

Without it each client process (a Ray actor, one per core) loads the whole dataset, partitions
it for every client, loads the tokenizer and tokenises its clients' partitions: the same work as
the server, and the libraries that do it (datasets, pyarrow, pandas, flwr-datasets, scipy,
matplotlib: about 180 MB a process). With it, the server, which has done that work anyway,
writes `<run dir>/prepared/tokens.pt`: the partitions' token tensors, concatenated (one tensor
per field, rows in partition order) with each partition's offset, and the label names. A client
process memory-maps the file and serves a partition as a slice of it, so the pages are shared
by every process on the machine and each reads only the rows of the partitions it serves.

The frozen base weights (every parameter but the adapters and the task head, which no method
changes) are written beside them (`base.pt`) on the CPU: each process then points its model's
frozen parameters at the mapped file, so the machine holds one copy of the base model, not one per
process (a 1B-parameter model in float32 is 4.4 GB a process). A process that writes to one of them
would get a private copy of that page (copy on write), never change the file.

The tensors are exactly what `Worker.client_tokens` computes from the data (the server computes
them that way), and the weights are checked equal to the process's own before they replace them,
so a run is the same with or without the files. It is used only where it is
found: in the run directory that the run config names (`fedsb run` always names one) and written
for the same config (a hash of it is stored beside the tensors). A SuperNode of a multi-node
deployment, which has its own data and no shared run directory, loads its data itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fedsb.experiment.config import ExperimentConfig

PREPARED_FILE = Path("prepared") / "tokens.pt"
BASE_FILE = Path("prepared") / "base.pt"  # the frozen base weights (CPU runs)
ASSIGNMENT_FILE = Path("prepared") / "nodes.json"  # a simulation's node id -> partition id
VERSION = 1


def config_key(config: ExperimentConfig) -> str:
    """What the prepared tokens depend on: the whole resolved config (a run's own)."""
    text = json.dumps([VERSION, config.to_dict()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class PreparedPartitions:
    """The clients' token tensors of one run, memory-mapped (`read_prepared`)."""

    def __init__(self, content: dict[str, Any], base_weights: dict[str, torch.Tensor] | None = None):
        self.label_names: list[str] = list(content["label_names"])
        self._fields: dict[str, torch.Tensor] = content["fields"]
        self._offsets: list[int] = list(content["offsets"])
        self.base_weights = base_weights  # name -> mapped tensor, or None

    @property
    def num_partitions(self) -> int:
        return len(self._offsets) - 1

    def size(self, partition_id: int) -> int:
        return self._offsets[partition_id + 1] - self._offsets[partition_id]

    def tokens(self, partition_id: int) -> dict[str, torch.Tensor]:
        """The partition's tensors: views of the mapped file (read-only, as tokenised data is)."""
        if not 0 <= partition_id < self.num_partitions:
            raise IndexError(f"partition {partition_id} of {self.num_partitions}")
        start, end = self._offsets[partition_id], self._offsets[partition_id + 1]
        return {name: values[start:end] for name, values in self._fields.items()}


def write_prepared(run_dir: Path, config: ExperimentConfig, label_names: list[str],
                   partition_tokens: list[dict[str, torch.Tensor]]) -> Path | None:
    """Write the run's prepared tokens (atomically); None, writing nothing, when the partitions'
    tensors do not stack (their widths differ), in which case clients load their data themselves."""
    names = list(partition_tokens[0])
    if any(list(tokens) != names for tokens in partition_tokens):
        return None
    fields = {}
    for name in names:
        parts = [tokens[name] for tokens in partition_tokens]
        if any(p.shape[1:] != parts[0].shape[1:] or p.dtype != parts[0].dtype for p in parts):
            return None
        fields[name] = torch.cat(parts).contiguous()
    offsets = [0]
    for tokens in partition_tokens:
        offsets.append(offsets[-1] + len(tokens[names[0]]))
    path = Path(run_dir) / PREPARED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save({"key": config_key(config), "label_names": list(label_names), "fields": fields,
                "offsets": offsets}, tmp)
    os.replace(tmp, path)
    return path


def read_prepared(run_dir: str | Path | None, config: ExperimentConfig) -> PreparedPartitions | None:
    """The run's prepared tokens if run_dir has them for this config, else None."""
    if not run_dir:
        return None
    path = Path(run_dir) / PREPARED_FILE
    if not path.is_file():
        return None
    key = config_key(config)
    content = torch.load(path, mmap=True, weights_only=True)
    if content.get("key") != key:
        return None
    base = None
    if (Path(run_dir) / BASE_FILE).is_file():
        saved = torch.load(Path(run_dir) / BASE_FILE, mmap=True, weights_only=True)
        base = saved["weights"] if saved.get("key") == key else None
    return PreparedPartitions(content, base)


def write_base_weights(run_dir: Path, config: ExperimentConfig, model: torch.nn.Module) -> Path:
    """Write the model's frozen base weights (atomically), for the processes to share."""
    from fedsb.core.adapters import frozen_base_parameters

    weights = {name: p.detach() for name, p in frozen_base_parameters(model).items()}
    path = Path(run_dir) / BASE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save({"key": config_key(config), "weights": weights}, tmp)
    os.replace(tmp, path)
    return path


def share_base_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> int:
    """Point the model's frozen parameters at the mapped `weights` where they are equal to its own
    (same name, shape, dtype and values); returns how many it shares."""
    from fedsb.core.adapters import frozen_base_parameters

    shared = 0
    for name, param in frozen_base_parameters(model).items():
        mapped = weights.get(name)
        if (mapped is None or param.device.type != "cpu" or mapped.shape != param.shape
                or mapped.dtype != param.dtype or not torch.equal(mapped, param.data)):
            continue
        param.data = mapped
        shared += 1
    return shared



# -- a simulation's partitions, assigned by the server ------------------------------------------
# In a simulation every virtual client's data is generated the same everywhere, so which node
# serves which partition is the simulator's choice (Flower's own is node i <-> partition i, at
# random node ids). The server assigns them (`fedsb run` asks for it with the run config's
# `assign-partitions`) instead of asking each node, which costs a message per node (25 s for
# 1000 nodes); the simulated clients, which share the run directory, read the assignment here.

def write_assignment(run_dir: Path, nodes: dict[int, int]) -> Path:
    """Write partition id -> node id (atomically) for the run's client processes."""
    path = Path(run_dir) / ASSIGNMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({str(node): pid for pid, node in nodes.items()}))
    os.replace(tmp, path)
    return path


_assignments: dict[tuple[str, int], dict[int, int]] = {}


def assigned_partition(run_dir: str | Path, node_id: int) -> int:
    """The partition the server assigned to node_id (read once per version of the file)."""
    path = Path(run_dir) / ASSIGNMENT_FILE
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except FileNotFoundError:
        raise RuntimeError(f"assign-partitions is set but {path} does not exist: the server assigns "
                           "partitions before it sends the clients anything") from None
    if key not in _assignments:
        _assignments.clear()
        _assignments[key] = {int(node): pid for node, pid in json.loads(path.read_text()).items()}
    assignment = _assignments[key]
    if node_id not in assignment:
        raise RuntimeError(f"node {node_id} has no partition in {path}")
    return assignment[node_id]
