"""The Flower ServerApp: builds the experiment from the run config and runs the method's strategy.

Everything numeric happens in `fedsb`; this file only talks to the Grid (which nodes exist,
which partition each holds, the LoRA-SB init exchange) and writes the run directory.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedsb.core.models import load_model
from fedsb.data.partition import plot_partition
from fedsb.experiment.cohort import sample_clients
from fedsb.experiment.config import ExperimentConfig, from_run_config
from fedsb.experiment.export import export_adapter
from fedsb.experiment.meter import Meter
from fedsb.experiment.recorder import RunRecorder
from fedsb.experiment.rundir import run_dir_for, write_config
from fedsb.experiment.worker import Worker, get_worker, quiet_libraries
from fedsb.federation.protocol import INIT_RECORD, NUM_EXAMPLES, meter_message, to_record, to_state
from server.strategy import LEDGER_KEYS, FedsbStrategy

APP_DIR = Path(__file__).resolve().parents[1]  # the installed app: config paths are relative to it
QUERY_TIMEOUT_S = 600.0

quiet_libraries()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)


def run_server(grid: Grid, run_config: dict[str, Any]) -> FedsbStrategy:
    """The whole run: config, run directory, clients, init, rounds, outputs. Returns the strategy."""
    config = from_run_config(run_config, APP_DIR)  # a bad config stops here, before any training
    run_dir = run_dir_for(config, str(run_config.get("run-dir", "")))
    write_config(run_dir, config.to_dict())
    label = f"{config.method.name} r={config.method.rank}"
    if config.method.name == "fedsb" and config.method.init.source == "pooled":
        label += " ORACLE init (pooled data)"  # the paper's setting, not a federated result
    if config.federation.centralised:
        label += " CENTRALISED reference (not federated)"
    if config.privacy.enabled:
        label += f" DP eps<={config.privacy.epsilon:g}" + (" NOT PRIVATE" if _not_private(config) else "")
    log(INFO, "[%s] run directory %s", label, run_dir)

    worker = get_worker(config)
    plot_partition(run_dir, worker.data.partitions, worker.data.label_names)
    nodes = discover_clients(grid, config.federation.num_clients, float(run_config.get("node-wait-s", 60)))
    meter = Meter()
    recorder = RunRecorder(run_dir, meter, label, log=lambda line: log(INFO, line))

    client_gradients, ledgers = None, {}
    if config.method.name == "fedsb" and config.method.init.source == "clients":
        client_gradients, ledgers = gather_init_gradients(grid, config, nodes, meter)
    state = worker.initial_state(client_gradients)

    strategy = FedsbStrategy(
        worker.method, state, nodes, clients_per_round=min(config.clients_per_round(), len(nodes)),
        seed=config.seed, meter=meter, client_eval=config.eval.client_eval, ledgers=ledgers,
        target_epsilon=config.privacy.epsilon if config.privacy.enabled else None,
        uniform_weights=config.federation.weighting == "uniform")
    chosen: dict[str, Any] = {}  # the state of the round the recorder chooses (best validation accuracy)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Every round: the validation split (which every choice looks at); also the bookkeeping."""
        round_state = to_state(arrays)
        evaluation = worker.evaluate_global(round_state, "validation")
        extra: dict[str, Any] = {}
        if server_round in strategy.rounds:
            r = strategy.rounds[server_round]
            extra = {"clients": r.cohort, "accepted": r.accepted, "rejected": r.rejected,
                     "train_loss": r.train_loss}
            extra.update({f"client_{k}": v for k, v in r.client_eval.items()})
            if config.privacy.enabled:
                extra.update(_epsilon_metrics(r.epsilons, strategy.ledgers), refused=r.refused)
        elif config.privacy.enabled:  # round 0: what the private init (if any) has spent
            extra.update(_epsilon_metrics({}, strategy.ledgers))
        recorder.end_round(server_round, evaluation, **extra)
        best = recorder.best_row()  # one selection rule: the recorder's, which summary.json reports
        if best is not None and best["round"] == server_round:
            chosen.update(round=server_round, state=round_state)
        return MetricRecord({"val-accuracy": evaluation["accuracy"], "val-loss": evaluation["loss"]})

    strategy.start(grid, to_record(state), num_rounds=config.federation.rounds, evaluate_fn=evaluate)

    # The test split is looked at only now, at the two points a run reports: the round chosen on
    # validation, and the last round.
    final_test = worker.evaluate_global(strategy.global_state, "test")
    last_round_chosen = not chosen or chosen["round"] == config.federation.rounds
    chosen_test = final_test if last_round_chosen else worker.evaluate_global(chosen["state"], "test")
    summary = recorder.summary(chosen_test, final_test,
                               **_summary_fields(config, worker, len(nodes), run_dir),
                               privacy=_privacy_summary(config, strategy.ledgers))
    export = export_adapter(run_dir, _fresh_base_model(config, worker), worker.method,
                                    strategy.global_state, config.model.task)
    log(INFO, "[%s] test accuracy %.3f at round %s (chosen on validation: %.3f); last round's test accuracy "
        "%.3f; sent up %s B, down %s B; adapter: %s", label, summary["test_accuracy"], summary["best_round"],
        summary["best_val_accuracy"], summary["final_test_accuracy"],
        f"{summary['communication']['up']['bytes']:,}", f"{summary['communication']['down']['bytes']:,}",
        export)
    return strategy


def discover_clients(grid: Grid, num_clients: int, wait_s: float) -> dict[int, int]:
    """Partition id -> node id of the connected SuperNodes (waits up to wait_s for all of them).

    Node ids are random per run; partition ids (from each node's --node-config) are stable, so
    cohorts and aggregation order are defined over partition ids. Nodes are asked as soon as
    they connect, so a wrong federation size fails at once, not after the wait.
    """
    deadline = time.monotonic() + wait_s
    nodes: dict[int, int] = {}
    while True:
        new = sorted(set(grid.get_node_ids()) - set(nodes.values()))
        if new:
            nodes.update(_describe(grid, new, num_clients, nodes))
        if len(nodes) >= num_clients or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if not nodes:
        raise RuntimeError(f"no SuperNode connected within {wait_s:.0f} s")
    if len(nodes) < num_clients:
        log(INFO, "%d of %d clients connected; going on with partitions %s", len(nodes), num_clients,
            sorted(nodes))
    return dict(sorted(nodes.items()))


def _describe(grid: Grid, node_ids: list[int], num_clients: int, known: dict[int, int]) -> dict[int, int]:
    replies = grid.send_and_receive(
        [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids],
        timeout=QUERY_TIMEOUT_S)
    found: dict[int, int] = {}
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to describe itself: "
                               f"{reply.error.reason}")
        info = reply.content["node"]
        pid, total = int(info["partition-id"]), int(info["num-partitions"])
        if total != num_clients:
            raise RuntimeError(
                f"federation.num_clients is {num_clients} but the SuperNodes have num-partitions={total}: "
                f"in a simulation run with --federation-config \"num-supernodes={num_clients}\"; in a "
                f"deployment start each SuperNode with --node-config \"partition-id=I num-partitions="
                f"{num_clients}\"")
        if pid in known or pid in found or not 0 <= pid < num_clients:
            raise RuntimeError(f"partition-id {pid} is duplicated or outside 0..{num_clients - 1}")
        found[pid] = reply.metadata.src_node_id
    return found


def gather_init_gradients(grid: Grid, config: ExperimentConfig, nodes: dict[int, int], meter: Meter
                          ) -> tuple[list[dict], dict[int, dict[str, float]]]:
    """init.source=clients: round 1's cohort uploads its local init gradients (metered as round 0).

    Returns the gradients in partition order and, with DP on, each client's privacy metrics
    (the private init is charged to its ledger)."""
    cohort = sample_clients(list(nodes), min(config.clients_per_round(), len(nodes)), config.seed, 1)
    messages = [Message(RecordDict({"config": ConfigRecord({"server-round": 0})}), dst_node_id=nodes[pid],
                        message_type=f"{MessageType.QUERY}.init_gradient") for pid in cohort]
    partition_of = {node: pid for pid, node in nodes.items()}
    gradients, ledgers = {}, {}
    for reply in grid.send_and_receive(messages, timeout=QUERY_TIMEOUT_S):
        pid = partition_of[reply.metadata.src_node_id]
        if reply.has_error():
            raise RuntimeError(f"client {pid} failed to compute its init gradient: {reply.error.reason}")
        meter_message(meter, reply.content, round=0, client=pid, phase="init", direction="up")
        gradients[pid] = to_state(reply.content[INIT_RECORD])
        if config.privacy.enabled:
            metrics = reply.content["metrics"]
            ledgers[pid] = {k: float(metrics[k]) for k in LEDGER_KEYS if k in metrics}
        log(INFO, "init gradient from client %d (%d examples)", pid,
            int(reply.content["metrics"][NUM_EXAMPLES]))
    return [gradients[pid] for pid in sorted(gradients)], ledgers


def _not_private(config: ExperimentConfig) -> bool:
    from fedsb.training.privacy import privacy_status

    return privacy_status(config).startswith("not private")


def _epsilon_metrics(trained: dict[int, float], ledgers: dict[int, dict[str, float]]) -> dict[str, Any]:
    """A round's privacy ledger: epsilon of the clients that trained, and the max over all so far."""
    spent = [ledger["epsilon"] for ledger in ledgers.values()]
    return {"epsilon_max": max(trained.values(), default=0.0),
            "epsilon_mean": sum(trained.values()) / len(trained) if trained else 0.0,
            "epsilon_max_all": max(spent, default=0.0)}


def _privacy_summary(config: ExperimentConfig, ledgers: dict[int, dict[str, float]]) -> dict[str, Any]:
    if not config.privacy.enabled:
        return {"enabled": False}
    from fedsb.training.privacy import privacy_status

    per_client = {str(pid): ledgers[pid] for pid in sorted(ledgers)}
    return {
        "enabled": True, "status": privacy_status(config),
        "guarantee": "sample-level (epsilon, delta)-DP per client with respect to its own data, "
                     "composed over every round (DP-SGD, Opacus)",
        "target_epsilon": config.privacy.epsilon, "accountant": config.privacy.accountant,
        "epsilon_max": max((c["epsilon"] for c in per_client.values()), default=0.0),
        "released_outside_dp": _released_outside_dp(config),
        "delta_max": max((c["delta"] for c in per_client.values()), default=None),
        "max_grad_norm": config.privacy.max_grad_norm,
        "noise_multiplier_range": [min((c["noise_multiplier"] for c in per_client.values()), default=None),
                                   max((c["noise_multiplier"] for c in per_client.values()), default=None)],
        "per_client": per_client,
    }


def _released_outside_dp(config: ExperimentConfig) -> str:
    """What a private client sends beside its DP-trained tensors, which the epsilon does not cover."""
    if config.federation.weighting == "examples":
        return ("each client's number of training examples (its aggregation weight, "
                "federation.weighting=examples) is sent in the clear; federation.weighting=uniform avoids it")
    return "nothing: every client reports the weight 1 (federation.weighting=uniform)"


def _fresh_base_model(config: ExperimentConfig, worker: Worker):
    m = config.model
    return load_model(m.name, task=m.task, num_labels=len(worker.data.label_names), seed=config.seed)


def _summary_fields(config: ExperimentConfig, worker: Worker, connected: int, run_dir: Path
                    ) -> dict[str, Any]:
    init_source = config.method.init.source if config.method.name == "fedsb" else None
    return {
        "method": config.method.name, "rank": config.method.rank, "alpha": config.lora_alpha,
        "seed": config.seed, "model": config.model.name, "data": config.data.source,
        "num_clients": config.federation.num_clients, "connected_clients": connected,
        "clients_per_round": config.clients_per_round(), "rounds": config.federation.rounds,
        "local_steps": config.train.local_steps, "lr": config.train.lr, "init_lr": config.init_lr,
        "weighting": config.federation.weighting, "centralised": config.federation.centralised,
        "init_source": init_source,
        "oracle": init_source == "pooled",  # the paper's pooled-data init: not a federated result
        "partition": {"scheme": config.partition.scheme, "alpha": config.partition.alpha,
                      "label_counts": worker.data.stats(), "label_names": worker.data.label_names},
        "run_dir": str(run_dir),
    }
