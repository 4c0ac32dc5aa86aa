"""The Flower ServerApp: builds the experiment from the run config and runs the method's strategy.

Everything numeric happens in `fedsb`; this file only talks to the Grid (which nodes exist,
which partition each holds, the init-gradient exchange) and hands what comes back to `fedsb`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedsb.core.models import load_model
from fedsb.data.partition import plot_partition
from fedsb.experiment.checkpoint import ServerCheckpoint, load_checkpoint, save_checkpoint
from fedsb.experiment.cohort import sample_clients
from fedsb.experiment.config import ExperimentConfig
from fedsb.experiment.export import export_adapter
from fedsb.experiment.meter import Meter
from fedsb.experiment.prepared import (
    read_prepared,
    share_base_weights,
    write_assignment,
    write_base_weights,
    write_prepared,
)
from fedsb.experiment.recorder import RunRecorder
from fedsb.experiment.report import (
    epsilon_metrics,
    privacy_summary,
    run_label,
    run_setting,
    truncated_ranks,
)
from fedsb.experiment.run_config import from_run_config
from fedsb.experiment.rundir import run_dir_for, write_config
from fedsb.experiment.summary import RunSummary
from fedsb.experiment.worker import Worker, get_worker, quiet_libraries
from fedsb.federation.progress import ProgressGrid
from fedsb.federation.protocol import (
    CONFIG_RECORD,
    INIT_GRADIENT_QUERY,
    INIT_RECORD,
    LEDGER_KEYS,
    LEDGER_RECORD,
    METRICS_RECORD,
    NODE_RECORD,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    SERVER_ROUND,
    meter_message,
    to_record,
    to_state,
)
from fedsb.methods.ranks import assign_client_ranks
from server.privacy_budget import PrivacyBudget
from server.strategy import FedsbStrategy, RoundOffset

APP_DIR = Path(__file__).resolve().parents[1]  # the installed app: config paths are relative to it
QUERY_TIMEOUT_S = 600.0

quiet_libraries()
app = ServerApp()


@dataclass
class ServerRun:
    """A finished run: its strategy (the global state, each round's log), its summary and directory."""

    strategy: FedsbStrategy
    privacy: PrivacyBudget | None
    summary: RunSummary
    run_dir: Path


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)


def run_server(grid: Grid, run_config: dict[str, Any]) -> ServerRun:
    """The whole run: config, run directory, clients, init, rounds, outputs."""
    config = from_run_config(run_config, APP_DIR)  # a bad config stops here, before any training
    expected = None if config.federation.num_clients == "auto" else config.federation.num_clients
    wait_s = float(run_config.get("node-wait-s", 60))
    assign = bool(run_config.get("assign-partitions", False)) and expected is not None
    nodes = assign_partitions(grid, expected, wait_s) if assign else discover_clients(grid, expected, wait_s)
    config = config.with_clients(len(nodes))  # 'auto': as many clients as SuperNodes
    run_dir = run_dir_for(config, str(run_config.get("run-dir", "")))
    write_config(run_dir, config.to_dict())
    if assign:
        write_assignment(run_dir, nodes)
    worker = get_worker(config)
    label = run_label(config, worker)
    log(INFO, "[%s] run directory %s", label, run_dir)
    plot_partition(run_dir, worker.data.partitions, worker.data.label_names)
    prepared = read_prepared(run_dir, worker.config)  # a resumed run's are there already
    if prepared is None:  # for the client processes of this machine
        write_prepared(run_dir, worker.config, worker.data.label_names,
                       [worker.client_tokens(pid) for pid in range(len(worker.data.partitions))])
        if worker.device.type == "cpu":
            write_base_weights(run_dir, worker.config, worker.model)
        prepared = read_prepared(run_dir, worker.config)
    if prepared is not None and prepared.base_weights is not None:  # this process shares them too
        share_base_weights(worker.model, prepared.base_weights)
    meter = Meter()
    checkpoint: ServerCheckpoint | None = None
    if run_config.get("resume", False):  # continue after the last completed round
        checkpoint, state, chosen_state = load_checkpoint(run_dir)
    # Resumed: the rows and the meter so far come back from metrics.jsonl and comm.csv.
    recorder = RunRecorder(run_dir, meter, label, log=lambda line: log(INFO, line),
                           accuracy_name="exact match" if worker.generates else "accuracy",
                           resume_after=checkpoint.round if checkpoint else None,
                           tracking=config.tracking, config=config.to_dict())
    client_gradients, init_ledgers, init_ledger_json = None, {}, {}
    if checkpoint is not None:
        log(INFO, "[%s] resuming after round %d of %d", label, checkpoint.round, config.federation.rounds)
    else:
        if worker.init_source == "clients":
            client_gradients, init_ledgers, init_ledger_json = gather_init_gradients(
                grid, config, nodes, meter)
        state = worker.initial_state(client_gradients)
    offset = checkpoint.round if checkpoint else 0
    client_ranks = client_ranks_of(config, worker, nodes)
    if client_ranks:
        ranks = list(client_ranks.values())
        log(INFO, "[%s] client ranks: %s", label,
            ", ".join(f"{rank} x {ranks.count(rank)}" for rank in sorted(set(ranks))))

    strategy = FedsbStrategy(
        worker.method, state, nodes, clients_per_round=min(config.clients_per_round(), len(nodes)),
        seed=config.seed, meter=meter, client_eval=config.eval.client_eval,
        uniform_weights=config.federation.weighting == "uniform", min_clients=config.federation.min_clients,
        max_failed_rounds=config.federation.max_failed_rounds,
        max_update_norm=config.federation.max_update_norm, client_ranks=client_ranks)
    budget = (PrivacyBudget(strategy, config.privacy.epsilon, init_ledgers, init_ledger_json)
              if config.privacy.enabled else None)
    chosen: dict[str, Any] = {}  # the state of the round the recorder chooses (best validation accuracy)
    if checkpoint is not None:
        strategy.seen = set(checkpoint.seen)
        strategy.resend = set(checkpoint.seen)  # their new processes need the one-time tensors again
        if budget is not None:
            budget.resume({int(k): v for k, v in checkpoint.ledgers.items()},
                          {int(k): v for k, v in checkpoint.client_ledgers.items()})
        if checkpoint.chosen_round is not None:
            chosen.update(round=checkpoint.chosen_round, state=chosen_state)

    def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Every round: the validation split (which every choice looks at); also the bookkeeping."""
        server_round = flower_round + offset
        if flower_round == 0 and offset:
            return None  # evaluated and recorded before the stop
        round_state = to_state(arrays)
        worker.peak_memory()
        evaluation = worker.evaluate_global(round_state, "validation")
        server_peak = worker.peak_memory()
        extra: dict[str, Any] = {}
        if server_peak is not None:
            extra["gpu_peak_bytes"] = server_peak
        if server_round in strategy.rounds:
            r = strategy.rounds[server_round]
            extra.update(clients=r.cohort, accepted=r.accepted, rejected=r.rejected, failed=r.failed,
                         skipped=r.skipped, train_loss=r.train_loss)
            if r.gpu_peak_bytes is not None:
                extra["gpu_peak_bytes"] = max(r.gpu_peak_bytes, server_peak or 0)
            extra.update({f"client_{k}": v for k, v in r.client_eval.items()})
            if budget is not None:
                extra.update(epsilon_metrics(r.epsilons, budget.ledgers), refused=r.refused)
        elif budget is not None:  # round 0: what the private init (if any) has spent
            extra.update(epsilon_metrics({}, budget.ledgers))
        recorder.end_round(server_round, evaluation, **extra)
        best = recorder.best_row()  # one selection rule: the recorder's, which summary.json reports
        if best is not None and best.round == server_round:
            chosen.update(round=server_round, state=round_state)
        save_checkpoint(run_dir, ServerCheckpoint(
            round=server_round, chosen_round=chosen.get("round"), seen=sorted(strategy.seen),
            ledgers={str(k): v for k, v in (budget.ledgers if budget else {}).items()},
            client_ledgers={str(k): v for k, v in (budget.ledger_json if budget else {}).items()}),
            round_state, chosen.get("state"))
        return MetricRecord({"val-accuracy": evaluation["accuracy"], "val-loss": evaluation["loss"]})

    # A round on a real model can take long: say how many clients have replied while it runs.
    grid = ProgressGrid(grid, log=lambda line: log(INFO, "[%s] %s", label, line))
    runner: Strategy = budget or strategy
    if offset:
        runner = RoundOffset(runner, offset)
    runner.start(grid, to_record(state), num_rounds=config.federation.rounds - offset, evaluate_fn=evaluate,
                 timeout=config.federation.round_timeout_s)

    # The test split is looked at only now, at the two points a run reports: the round chosen on
    # validation, and the last round.
    final_test = worker.evaluate_global(strategy.global_state, "test")
    last_round_chosen = not chosen or chosen["round"] == config.federation.rounds
    chosen_test = final_test if last_round_chosen else worker.evaluate_global(chosen["state"], "test")
    setting = run_setting(config, worker, len(nodes), run_dir, client_ranks)
    chosen_state = chosen["state"] if chosen else strategy.global_state
    setting["test_accuracy_at_rank"] = {  # what a client of each rank would hold
        str(rank): worker.evaluate_global(chosen_state, "test", rank=rank)["accuracy"]
        for rank in truncated_ranks(config, client_ranks)} or None
    summary = recorder.summary(setting, chosen_test, final_test,
                               privacy=privacy_summary(config, budget.ledgers if budget else {}))
    export = export_adapter(run_dir, _fresh_base_model(config, worker), worker.method,
                            strategy.global_state, config.model.task)
    metric = recorder.accuracy_name
    log(INFO, "[%s] test %s %.3f at round %s (chosen on validation: %.3f); last round's test %s "
        "%.3f; sent up %s B, down %s B; adapter: %s", label, metric, summary.test_accuracy,
        summary.best_round, summary.best_val_accuracy, metric, summary.final_test_accuracy,
        f"{summary.bytes_total('up'):,}", f"{summary.bytes_total('down'):,}", export)
    return ServerRun(strategy, budget, summary, run_dir)


def client_ranks_of(config: ExperimentConfig, worker: Worker, nodes: dict[int, int]) -> dict[int, int] | None:
    """Each partition's adapter rank (federation.client_ranks; None: every client the global rank)."""
    f = config.federation
    if f.client_ranks is None:
        return None
    sizes = [len(p) for p in worker.data.partitions] if f.rank_assignment == "by_size" else None
    ranks = assign_client_ranks(f.client_ranks, f.rank_assignment, len(worker.data.partitions), config.seed,
                                sizes)
    return {pid: ranks[pid] for pid in nodes}


def discover_clients(grid: Grid, num_clients: int | None, wait_s: float) -> dict[int, int]:
    """Partition id -> node id of the connected SuperNodes (waits up to wait_s for all of them).

    `num_clients` None (the config's 'auto'): as many as the nodes say the federation has
    (their num-partitions), which they must all agree on.

    Node ids are random per run; partition ids (from each node's --node-config) are stable, so
    cohorts and aggregation order are defined over partition ids. Nodes are asked as soon as
    they connect, so a wrong federation size fails at once, not after the wait.
    """
    start = time.monotonic()
    deadline = start + wait_s
    nodes: dict[int, int] = {}
    while True:
        new = sorted(set(grid.get_node_ids()) - set(nodes.values()))
        if new:
            described, total = _describe(grid, new, num_clients, nodes)
            nodes.update(described)
            num_clients = num_clients or total
        if (num_clients and len(nodes) >= num_clients) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if not nodes:
        raise RuntimeError(f"no SuperNode connected within {wait_s:.0f} s")
    if num_clients and len(nodes) < num_clients:
        log(INFO, "%d of %d clients connected; going on with partitions %s", len(nodes), num_clients,
            sorted(nodes))
    log(INFO, "%d clients found in %.1f s", len(nodes), time.monotonic() - start)
    return dict(sorted(nodes.items()))


def assign_partitions(grid: Grid, num_clients: int, wait_s: float) -> dict[int, int]:
    """A simulation: partition id -> node id, assigned here (fedsb.experiment.prepared explains why)
    once the federation's num_clients nodes are registered; no message to any node."""
    start = time.monotonic()
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < num_clients and time.monotonic() < start + wait_s:
        time.sleep(0.5)
        node_ids = sorted(grid.get_node_ids())
    if len(node_ids) != num_clients:
        raise RuntimeError(f"federation.num_clients is {num_clients} but the simulation has {len(node_ids)} "
                           f"SuperNodes after {wait_s:.0f} s")
    log(INFO, "%d partitions assigned to the simulation's nodes in %.1f s", num_clients,
        time.monotonic() - start)
    return dict(enumerate(node_ids))


def _describe(grid: Grid, node_ids: list[int], num_clients: int | None, known: dict[int, int]
              ) -> tuple[dict[int, int], int]:
    replies = grid.send_and_receive(
        [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids],
        timeout=QUERY_TIMEOUT_S)
    found: dict[int, int] = {}
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to describe itself: "
                               f"{reply.error.reason}")
        info = reply.content[NODE_RECORD]
        pid, total = int(info[PARTITION_ID]), int(info[NUM_PARTITIONS])
        num_clients = num_clients or total  # 'auto': the first node says, the others must agree
        if total != num_clients:
            raise RuntimeError(
                f"federation.num_clients is {num_clients} but the SuperNodes have num-partitions={total}: "
                f"in a simulation run with --federation-config \"num-supernodes={num_clients}\"; in a "
                f"deployment start each SuperNode with --node-config \"partition-id=I num-partitions="
                f"{num_clients}\"")
        if pid in known or pid in found or not 0 <= pid < num_clients:
            raise RuntimeError(f"partition-id {pid} is duplicated or outside 0..{num_clients - 1}")
        found[pid] = reply.metadata.src_node_id
    return found, num_clients


def gather_init_gradients(grid: Grid, config: ExperimentConfig, nodes: dict[int, int], meter: Meter
                          ) -> tuple[list[dict], dict[int, dict[str, float]], dict[int, str]]:
    """init.source=clients: round 1's cohort uploads its local init gradients (metered as round 0).

    Returns the gradients in partition order and, with DP on, each client's privacy metrics and whole
    ledger (the private init is charged to it)."""
    cohort = sample_clients(list(nodes), min(config.clients_per_round(), len(nodes)), config.seed, 1)
    messages = [Message(RecordDict({CONFIG_RECORD: ConfigRecord({SERVER_ROUND: 0})}), dst_node_id=nodes[pid],
                        message_type=f"{MessageType.QUERY}.{INIT_GRADIENT_QUERY}") for pid in cohort]
    partition_of = {node: pid for pid, node in nodes.items()}
    gradients, ledgers, ledger_json = {}, {}, {}
    for reply in grid.send_and_receive(messages, timeout=QUERY_TIMEOUT_S):
        pid = partition_of[reply.metadata.src_node_id]
        if reply.has_error():
            raise RuntimeError(f"client {pid} failed to compute its init gradient: {reply.error.reason}")
        meter_message(meter, reply.content, round=0, client=pid, phase="init", direction="up")
        gradients[pid] = to_state(reply.content[INIT_RECORD])
        if config.privacy.enabled:
            metrics = reply.content[METRICS_RECORD]
            ledgers[pid] = {k: float(metrics[k]) for k in LEDGER_KEYS if k in metrics}
            ledger_json[pid] = str(reply.content[LEDGER_RECORD]["json"])
        log(INFO, "init gradient from client %d (%d examples)", pid,
            int(reply.content[METRICS_RECORD][NUM_EXAMPLES]))
    return [gradients[pid] for pid in sorted(gradients)], ledgers, ledger_json


def _fresh_base_model(config: ExperimentConfig, worker: Worker):
    m = config.model
    return load_model(m.name, task=m.task, num_labels=len(worker.data.label_names), seed=config.seed)
