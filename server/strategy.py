"""FedAvg's round loop, with a fedsb method deciding what is sent, received and aggregated.

Flower's `Strategy.start` drives the rounds; this strategy only fills its four hooks:
- configure_train: a seeded cohort; each client gets `method.download(state, first_time, rank)`
  (its rank: fedsb.methods.ranks),
  the tensors sent once (`method.sent_once`: LoRA-SB's B and A, FFA's A, LoRA-GA's B0 and A0) in
  a separate `init` record;
- aggregate_train: every reply is metered, validated (`method.validate_upload`) and either
  rejected with a reason or aggregated with `method.aggregate`; rejected replies never
  touch the global state;
- configure_evaluate / aggregate_evaluate: optional client-side evaluation of the global state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore import log

from fedsb.core.adapters import State, component_of
from fedsb.experiment.cohort import sample_clients
from fedsb.experiment.meter import Meter
from fedsb.federation.protocol import (
    ADAPTER_RECORD,
    CONFIG_RECORD,
    GPU_PEAK_BYTES,
    INIT_RECORD,
    METRICS_RECORD,
    NUM_EXAMPLES,
    SERVER_ROUND,
    meter_message,
    to_record,
    to_state,
)
from fedsb.methods.base import FederatedMethod, InvalidUpdate


class ClientFailed(InvalidUpdate):
    """A client that raised, or did not reply in time: recorded as failed, not as a bad update."""


class RunStopped(RuntimeError):
    """Too many rounds in a row without enough valid updates (federation.max_failed_rounds)."""


@dataclass
class RoundLog:
    """What happened to each sampled client in one round."""

    cohort: list[int]
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int | str, str] = field(default_factory=dict)  # partition id (or 'node N') -> reason
    failed: dict[int, str] = field(default_factory=dict)  # partition id -> why (raised, or no reply)
    skipped: bool = False  # fewer valid updates than min_clients: the global state is unchanged
    refused: dict[int, str] = field(default_factory=dict)  # partition id -> why (privacy budget)
    epsilons: dict[int, float] = field(default_factory=dict)  # with DP: accepted clients' epsilon so far
    train_loss: float = math.nan
    client_eval: dict[str, float] = field(default_factory=dict)
    gpu_peak_bytes: int | None = None  # the largest of the accepted clients' GPU peaks


class FedsbStrategy(FedAvg):
    """One federated method (`fedsb.methods`) as a Flower strategy; clients are partition ids."""

    def __init__(self, method: FederatedMethod, initial_state: State, nodes: dict[int, int], *,
                 clients_per_round: int, seed: int, meter: Meter, client_eval: bool = False,
                 uniform_weights: bool = False, min_clients: float = 1, max_failed_rounds: int = 3,
                 max_update_norm: float | None = None, client_ranks: dict[int, int] | None = None):
        super().__init__(fraction_train=clients_per_round / len(nodes),
                         fraction_evaluate=1.0 if client_eval else 0.0,
                         min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
        self.method = method
        self.global_state = dict(initial_state)
        self.nodes = dict(nodes)  # partition id -> node id
        self.partition_of = {node: pid for pid, node in nodes.items()}
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.meter = meter
        self.client_eval = client_eval
        self.seen: set[int] = set()  # clients that hold the one-time tensors
        # After a resume: clients that held them before the stop, whose new process must get them
        # again. Metered in `resend_meter`, so that the main meter stays the uninterrupted run's.
        self.resend: set[int] = set()
        self.resend_meter = Meter()
        self.rounds: dict[int, RoundLog] = {}
        self.uniform_weights = uniform_weights  # a plain mean, whatever sizes the clients report
        self.min_clients = min_clients
        self.max_failed_rounds = max_failed_rounds
        self.max_update_norm = max_update_norm
        self.skipped_in_a_row = 0
        # Partition id -> the rank of the adapter it holds (fedsb.methods.ranks); absent: the global rank.
        self.client_ranks = dict(client_ranks or {})
        self.outbox: dict[int, list[Message]] = {}  # round -> the training messages sent (see sender_of)

    def rank_of(self, pid: int) -> int | None:
        rank = self.client_ranks.get(pid)
        return None if rank == self.method.rank else rank

    def summary(self) -> None:
        log(INFO, "\t├──> method %s, rank %d, alpha %s; %d of %d clients per round (seeded)",
            self.method.name, self.method.rank, self.method.alpha, self.clients_per_round, len(self.nodes))
        log(INFO, "\t└──> client-side evaluation: %s", "on" if self.client_eval else "off")

    # -- training -----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        cohort = sample_clients(list(self.nodes), self.clients_per_round, self.seed, server_round)
        self.rounds[server_round] = RoundLog(cohort)
        # One payload per (with or without the one-time tensors, client rank), each serialised once
        # and shared by the messages, as FedAvg shares its one payload.
        needs = {pid: pid not in self.seen or pid in self.resend for pid in cohort}
        kinds = {(first, self.rank_of(pid)) for pid in cohort for first in (needs[pid], pid not in self.seen)}
        contents = {(first, rank): self._content(
                        self.method.download(self.global_state, first_time=first, rank=rank), server_round)
                    for first, rank in kinds}
        messages = []
        for pid in cohort:
            content = contents[needs[pid], self.rank_of(pid)]
            # Metered as the uninterrupted run sends it; a resumed client's repeat of the one-time
            # tensors apart.
            meter_message(self.meter, contents[pid not in self.seen, self.rank_of(pid)], round=server_round,
                          client=pid, phase="train", direction="down")
            if needs[pid] and pid in self.seen and INIT_RECORD in content.array_records:
                meter_message(self.resend_meter, RecordDict({INIT_RECORD: content[INIT_RECORD]}),
                              round=server_round, client=pid, phase="train", direction="down")
            self.resend.discard(pid)
            messages.append(Message(content, dst_node_id=self.nodes[pid], message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
        self.expect(server_round, messages)
        return messages

    def expect(self, server_round: int, messages: list[Message]) -> None:
        """The training messages really sent this round (a wrapper that replaces some says so here)."""
        self.outbox[server_round] = list(messages)

    def sender_of(self, server_round: int, reply: Message) -> int | None:
        """The partition a training reply answers for: the one its message was sent to, found by the
        message id it replies to (the grid sets the ids when it pushes; the SuperLink answers with an
        error, from its own node id, for a node it could not reach), provided it comes from that node or
        the SuperLink; None for a reply from any other node. Without ids: the sender's partition."""
        sent = {m.metadata.message_id: m for m in self.outbox.get(server_round, []) if m.metadata.message_id}
        message = sent.get(reply.metadata.reply_to_message_id)
        if message is None:
            return self.partition_of.get(reply.metadata.src_node_id)
        if reply.metadata.src_node_id not in (message.metadata.dst_node_id, SUPERLINK_NODE_ID):
            return None
        return self.partition_of.get(message.metadata.dst_node_id)

    def _content(self, download: State, server_round: int) -> RecordDict:
        once = {k: v for k, v in download.items() if component_of(k) in self.method.sent_once}
        every_round = {k: v for k, v in download.items() if k not in once}
        content = RecordDict({ADAPTER_RECORD: to_record(every_round),
                              CONFIG_RECORD: ConfigRecord({SERVER_ROUND: server_round})})
        if once:
            content[INIT_RECORD] = to_record(once)
        return content

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_log = self.rounds[server_round]
        by_client: dict[int, Message] = {}
        for m in replies:  # a reply from a node that was not asked this round is never aggregated
            pid = self.sender_of(server_round, m)
            if pid is None or pid not in round_log.cohort or pid in by_client:
                who = pid if pid is not None else f"node {m.metadata.src_node_id}"
                round_log.rejected[who] = "a reply from a node that was not asked this round"
                log(WARNING, "round %d: rejected a reply of %s: not asked", server_round, who)
                continue
            by_client[pid] = m
        uploads, weights, losses = [], [], []
        for pid in round_log.cohort:  # partition order: the aggregate does not depend on arrival order
            if pid in round_log.refused or pid in round_log.rejected:
                continue  # decided by a wrapper (the privacy budget), which metered the reply
            reply = by_client.get(pid)
            self.meter_reply(server_round, pid, reply)
            try:
                upload, num_examples, loss = self._parse_upload(reply, self.rank_of(pid))
            except ClientFailed as err:
                round_log.failed[pid] = str(err)
                log(WARNING, "round %d: client %d failed: %s", server_round, pid, err)
                continue
            except InvalidUpdate as err:
                round_log.rejected[pid] = str(err)
                log(WARNING, "round %d: rejected the update of client %d: %s", server_round, pid, err)
                continue
            self.seen.add(pid)
            round_log.accepted.append(pid)
            peak = reply.content[METRICS_RECORD].get(GPU_PEAK_BYTES)
            if isinstance(peak, int):
                round_log.gpu_peak_bytes = max(peak, round_log.gpu_peak_bytes or 0)
            uploads.append(upload)
            weights.append(1 if self.uniform_weights else num_examples)
            losses.append(loss)
        self.outbox.pop(server_round, None)
        needed = self.required_updates(len(round_log.cohort))
        if len(uploads) < needed:
            round_log.skipped = True
            self.skipped_in_a_row += 1
            log(WARNING, "round %d: %d valid update(s), %d needed (federation.min_clients): round skipped, "
                "the global state is unchanged", server_round, len(uploads), needed)
            if self.skipped_in_a_row >= self.max_failed_rounds:
                raise RunStopped(f"{self.skipped_in_a_row} rounds in a row without {needed} valid updates "
                                 f"(federation.max_failed_rounds); the run stops after round "
                                 f"{server_round - 1}, resumable with fedsb run --resume")
            return None, None
        self.skipped_in_a_row = 0
        self.global_state = self.method.aggregate(self.global_state, uploads, weights)
        round_log.train_loss = sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights)
        return to_record(self.global_state), MetricRecord(
            {"train-loss": round_log.train_loss, "clients": len(uploads)})

    def meter_reply(self, server_round: int, pid: int, reply: Message | None) -> None:
        """Meter what a client's training reply carried (whatever becomes of it)."""
        if reply is not None and reply.has_content():
            meter_message(self.meter, reply.content, round=server_round, client=pid, phase="train",
                          direction="up")

    def required_updates(self, cohort: int) -> int:
        """The valid updates a round needs (federation.min_clients: a count, or a fraction of the cohort)."""
        if self.min_clients <= 1 and not float(self.min_clients).is_integer():
            return max(1, math.ceil(self.min_clients * cohort))
        return min(int(self.min_clients), cohort)

    def _parse_upload(self, reply: Message | None, rank: int | None = None) -> tuple[State, int, float]:
        """A reply's upload (of a client of `rank`), example count and loss, or InvalidUpdate saying
        what is wrong."""
        if reply is None:
            raise ClientFailed("no reply within federation.round_timeout_s")
        if reply.has_error():
            raise ClientFailed(f"the client failed: {reply.error.reason}")
        records = reply.content
        if ADAPTER_RECORD not in records.array_records or METRICS_RECORD not in records.metric_records:
            raise InvalidUpdate(f"the reply needs the records {ADAPTER_RECORD!r} and {METRICS_RECORD!r}")
        metrics = records[METRICS_RECORD]
        num_examples = metrics.get(NUM_EXAMPLES)
        if not isinstance(num_examples, int) or num_examples <= 0:
            raise InvalidUpdate(f"{NUM_EXAMPLES} must be a positive integer, got {num_examples!r}")
        upload = to_state(records[ADAPTER_RECORD])
        self.method.validate_upload(upload, self.global_state, rank)
        if self.max_update_norm is not None:
            sent = self.method.upload(self.global_state, rank)  # what the client started from
            norm = math.sqrt(sum(float((v.double() - sent[k].double()).pow(2).sum())
                                 for k, v in upload.items()))
            if norm > self.max_update_norm:
                raise InvalidUpdate(f"update norm {norm:.4g} exceeds federation.max_update_norm "
                                    f"{self.max_update_norm:g}")
        return upload, num_examples, float(metrics.get("train-loss", math.nan))

    # -- client-side evaluation (optional) -------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        if not self.client_eval:
            return []
        messages = []
        contents: dict[int | None, RecordDict] = {}
        for pid in self.rounds[server_round].accepted:  # they hold the one-time tensors already
            rank = self.rank_of(pid)
            if rank not in contents:
                contents[rank] = self._content(
                    self.method.download(self.global_state, first_time=False, rank=rank), server_round)
            content = contents[rank]
            meter_message(self.meter, content, round=server_round, client=pid, phase="evaluate",
                          direction="down")
            messages.append(Message(content, dst_node_id=self.nodes[pid], message_type=MessageType.EVALUATE,
                                    group_id=str(server_round)))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        totals: dict[str, float] = {}
        count = 0
        for reply in replies:
            if reply.has_error() or METRICS_RECORD not in reply.content.metric_records:
                continue
            metrics = reply.content[METRICS_RECORD]
            n = int(metrics.get(NUM_EXAMPLES, 0))
            for name in ("accuracy", "loss"):
                totals[name] = totals.get(name, 0.0) + n * float(metrics[name])
            count += n
        if not count:
            return None
        self.rounds[server_round].client_eval = {name: total / count for name, total in totals.items()}
        return MetricRecord(self.rounds[server_round].client_eval)


class RoundOffset(Strategy):
    """Runs rounds offset+1, offset+2, ... of `strategy` under Flower's loop, which counts from 1:
    how a resumed run continues after the `offset` rounds it had completed."""

    def __init__(self, strategy: Strategy, offset: int):
        self.strategy = strategy
        self.offset = offset

    def summary(self) -> None:
        self.strategy.summary()
        log(INFO, "\t└──> resumed after round %d: Flower's round k is the run's round k + %d",
            self.offset, self.offset)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)
