"""The clients' privacy budgets, as a wrapper around any fedsb strategy (in the manner of Flower's
`flwr.serverapp.strategy.DifferentialPrivacy*` wrappers).

DP-SGD runs on the clients (sample-level DP, each client with respect to its own data); the server
only enforces the budget and keeps the books. For every training reply it:
- keeps the client's latest privacy ledger (epsilon, delta, noise multiplier, ...), never an
  overspending one;
- records a client that refused to train (its budget would be exceeded) with its reason;
- rejects, with a reason, an update whose reported epsilon is above the target: it never reaches
  the wrapped strategy's aggregate, so it never touches the global model.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedsb.federation.protocol import LEDGER_KEYS, LEDGER_RECORD, METRICS_RECORD, REFUSAL_RECORD, REFUSED
from server.strategy import FedsbStrategy


class PrivacyBudget(Strategy):
    """Enforce each client's target epsilon around `strategy`; `ledgers` holds what the private init spent."""

    def __init__(self, strategy: FedsbStrategy, target_epsilon: float,
                 ledgers: dict[int, dict[str, float]] | None = None,
                 ledger_json: dict[int, str] | None = None):
        self.strategy = strategy
        self.target_epsilon = target_epsilon
        self.ledgers = dict(ledgers or {})  # partition id -> its latest privacy metrics
        self.ledger_json = dict(ledger_json or {})  # partition id -> its whole ledger, for checkpoints
        self.restore: set[int] = set()  # after a resume: clients whose ledger goes back down once

    def resume(self, ledgers: dict[int, dict[str, float]], ledger_json: dict[int, str]) -> None:
        """Continue with the ledgers of a checkpoint; each client gets its own back when next sampled."""
        self.ledgers, self.ledger_json = dict(ledgers), dict(ledger_json)
        self.restore = set(ledger_json)

    def within_budget(self, epsilon: float | None) -> bool:
        return epsilon is not None and epsilon <= self.target_epsilon * (1 + 1e-9)

    def summary(self) -> None:
        self.strategy.summary()
        log(INFO, "\t└──> privacy: each client's target epsilon %g, enforced by the server",
            self.target_epsilon)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        for i, message in enumerate(messages):
            pid = self.strategy.partition_of[message.metadata.dst_node_id]
            if pid in self.restore:  # a resumed run: the client's new process needs its ledger
                content = RecordDict(dict(message.content.items()))
                content[LEDGER_RECORD] = ConfigRecord({"json": self.ledger_json[pid]})
                messages[i] = Message(content, dst_node_id=message.metadata.dst_node_id,
                                      message_type=message.metadata.message_type,
                                      group_id=message.metadata.group_id)
                self.restore.discard(pid)
        self.strategy.expect(server_round, messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_log = self.strategy.rounds[server_round]
        passed = []
        for reply in replies:
            pid = self.strategy.sender_of(server_round, reply)
            if pid is None or not reply.has_content() or METRICS_RECORD not in reply.content.metric_records:
                passed.append(reply)  # the wrapped strategy rejects it with its reason
                continue
            metrics = reply.content[METRICS_RECORD]
            epsilon = metrics.get("epsilon")
            if self.within_budget(epsilon):
                self.ledgers[pid] = {k: float(metrics[k]) for k in LEDGER_KEYS if k in metrics}
                if LEDGER_RECORD in reply.content.config_records:
                    self.ledger_json[pid] = str(reply.content[LEDGER_RECORD]["json"])
            if metrics.get(REFUSED) == 1:
                refusal = reply.content.config_records.get(REFUSAL_RECORD)
                round_log.refused[pid] = str(refusal["reason"]) if refusal else ""
                log(INFO, "round %d: client %d refused to train: %s", server_round, pid,
                    round_log.refused[pid])
                continue
            if not self.within_budget(epsilon):
                self.strategy.meter_reply(server_round, pid, reply)  # it was sent, though never aggregated
                round_log.rejected[pid] = f"reports epsilon {epsilon}, above the target {self.target_epsilon}"
                log(WARNING, "round %d: rejected the update of client %d: %s", server_round, pid,
                    round_log.rejected[pid])
                continue
            passed.append(reply)
        result = self.strategy.aggregate_train(server_round, passed)
        round_log.epsilons = {pid: self.ledgers[pid]["epsilon"] for pid in round_log.accepted
                              if pid in self.ledgers}
        return result

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
