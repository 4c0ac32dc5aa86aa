"""The schema of a run's outputs: `summary.json` (`RunSummary`) and a `metrics.jsonl` line (`MetricsRow`).

Written by the run recorder (`fedsb.experiment.recorder`), read back by sweeps, plots and reports
(`fedsb.analysis`) through `RunSummary.read` and `read_metrics`: one definition, so the writer and the
readers cannot drift apart. Reading rejects a file whose keys are not this schema's, naming them.
No torch here: the analysis layer imports this module.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: the files stay strict JSON (e.g. DP runs release no loss)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: keys {unknown} are not in the schema of {cls.__name__}")
    return cls(**data)


@dataclass
class MetricsRow:
    """One round of a run: the global state on the validation split, the bytes, and what the clients did.

    Round 0 is the state before training (and any init traffic). Fields a run does not have are
    None: client fields before round 1, epsilon fields without DP, client_* without client_eval.
    """

    round: int
    val_accuracy: float | None
    val_loss: float | None
    bytes_up: int  # payload bytes (elements x itemsize) of this round's messages
    bytes_down: int
    cum_bytes_up: int
    cum_bytes_down: int
    wire_bytes_up: int  # the serialised array records (what Flower sends)
    wire_bytes_down: int
    wall_s: float  # since the run started
    clients: list[int] | None = None  # the cohort (partition ids)
    accepted: list[int] | None = None
    rejected: dict[str, str] | None = None  # partition id -> reason
    refused: dict[str, str] | None = None  # partition id -> why it refused (its privacy budget)
    failed: dict[str, str] | None = None  # partition id -> why it failed (raised, or no reply in time)
    skipped: bool | None = None  # fewer valid updates than federation.min_clients: state unchanged
    train_loss: float | None = None  # weighted mean over accepted clients (None under DP: not released)
    client_accuracy: float | None = None  # eval.client_eval: the global state on the clients' own data
    client_loss: float | None = None
    epsilon_max: float | None = None  # over the clients that trained this round
    epsilon_mean: float | None = None
    epsilon_max_all: float | None = None  # over every client so far
    gpu_peak_bytes: int | None = None  # on a GPU: the largest peak of the round's clients and the server
    val_perplexity: float | None = None  # causal LMs: exp(val_loss), the response tokens' perplexity

    def to_dict(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        for name in ("rejected", "refused", "failed"):
            if row[name] is not None:
                row[name] = {str(k): v for k, v in row[name].items()}
        return json_safe(row)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricsRow:
        return _from_dict(cls, data, METRICS_FILE)


def append_metrics(run_dir: Path, row: MetricsRow) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(row.to_dict()) + "\n")


def read_metrics(run_dir: str | Path) -> list[MetricsRow]:
    path = Path(run_dir) / METRICS_FILE
    return [MetricsRow.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class PrivacySummary:
    """What a run's differential privacy guaranteed and spent (`enabled` False: none)."""

    enabled: bool = False
    status: str | None = None  # 'private', or 'not private: <why>'
    guarantee: str | None = None
    target_epsilon: float | None = None
    accountant: str | None = None
    epsilon_max: float | None = None  # over every client
    delta_max: float | None = None
    released_outside_dp: str | None = None  # what clients send beside the DP-trained tensors
    max_grad_norm: float | None = None
    noise_multiplier_range: list[float | None] | None = None
    per_client: dict[str, dict[str, float]] | None = None  # partition id -> its ledger's metrics

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacySummary:
        return _from_dict(cls, data, f"{SUMMARY_FILE} privacy")


@dataclass
class RunSummary:
    """summary.json: a finished run. `test_accuracy` (at `best_round`, chosen on validation) is the number
    to report; `final_test_accuracy` is the last round's, beside it."""

    # The setting
    method: str
    method_label: str  # how figures and tables name the run's method: 'Fed-SB'; centralised: 'LoRA-SB'
    rank: int
    alpha: float
    seed: int
    model: str
    data: str
    num_clients: int
    connected_clients: int
    clients_per_round: int
    rounds: int
    local_steps: int
    lr: float
    init_lr: float
    weighting: str
    centralised: bool
    init_source: str | None  # where a gradient-based init's gradients came from (None: no such init)
    oracle: bool  # the pooled-data init: not a federated result
    partition: dict[str, Any]
    run_dir: str
    # What happened
    rounds_completed: int
    selection: str  # what chose best_round: 'validation'
    initial_val_accuracy: float | None
    final_val_accuracy: float | None
    final_val_loss: float | None
    best_val_accuracy: float | None
    best_round: int | None
    test_accuracy: float | None
    test_loss: float | None
    final_test_accuracy: float | None
    final_test_loss: float | None
    communication: dict[str, Any]  # fedsb.experiment.meter.Meter.summary(): totals by direction
    wall_s: float
    privacy: PrivacySummary = field(default_factory=PrivacySummary)
    # What the *_accuracy fields measure: 'accuracy' (classification), or 'exact match (...)' of a
    # causal LM's greedily generated answers
    accuracy_metric: str = "accuracy"
    # The adapter init (method.init.name, resolved: 'kaiming', 'olora', 'pissa', 'lora_ga', 'lora_sb');
    # None in a summary written before the init was a choice.
    init: str | None = None
    # Clients of different ranks (fedsb.methods.ranks): each partition's rank ("0" -> 8; None: every
    # client at `rank`), the rule that combined them, whether training sampled nested ranks, and the
    # test accuracy of the chosen round's adapter truncated to each of eval.truncated_ranks ("4" -> 0.71).
    client_ranks: dict[str, int] | None = None
    rank_aggregation: str | None = None
    nested_ranks: bool = False
    test_accuracy_at_rank: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        data = dict(data)
        data["privacy"] = PrivacySummary.from_dict(data.get("privacy") or {})
        return _from_dict(cls, data, SUMMARY_FILE)

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / SUMMARY_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> RunSummary:
        return cls.from_dict(json.loads((Path(run_dir) / SUMMARY_FILE).read_text()))

    def bytes_total(self, direction: str) -> int:
        return int(self.communication[direction]["bytes"])
