"""The real ServerApp and ClientApp in one process, over an in-process Grid: `fedsb demo` and the tests.

Only the network is replaced. `InProcessGrid.send_and_receive` hands each message to the
ClientApp (`clients.app.app`, loaded from the app directory as Flower loads it:
`fedsb.federation.apps`) with that node's own Context (its node_config and persistent
state), as a SuperNode would, and a ClientApp exception becomes an error reply, as in Flower.
Clients get deep copies of the messages, so nothing is shared by reference between server and
client. So `fedsb demo` runs the same round loop as `flwr run` (`server.app.run_server`), with
the same validation, metering, one-time tensors and DP; only the transport differs.

With `client_processes=W` the ClientApp calls run in a pool of W worker processes (each with
`client_threads` torch threads, each keeping its own base model, as a Ray client actor does):
the same work as a Flower simulation with W actors, without Flower's runtime. It is the
baseline of `benchmarks/simulation_overhead.py`.
"""

from __future__ import annotations

import copy
import multiprocessing
import random
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsb.federation.apps import load_client_app, load_server_runner, project_dir

# (partition id, reply) -> reply: to forge bad updates in tests; None: the reply is lost (a timeout)
Tamper = Callable[[int, Message], Message | None]


class InProcessGrid:
    """A Flower Grid whose N nodes are ClientApp calls in this process (node ids random, as in Flower)."""

    def __init__(self, num_nodes: int, run_config: Mapping[str, Any], seed: int = 0,
                 tamper: Tamper | None = None, client_threads: int | None = None,
                 client_processes: int | None = None, app_dir: str | Path | None = None):
        _set_task_identity()
        app_dir = Path(app_dir or project_dir()).resolve()
        self.client_app = load_client_app(app_dir)
        rng = random.Random(seed)
        node_ids = [rng.randrange(1, 2**62) for _ in range(num_nodes)]
        self.contexts = {
            node: Context(run_id=1, node_id=node, state=RecordDict(), run_config=dict(run_config),
                          node_config={"partition-id": i, "num-partitions": num_nodes})
            for i, node in enumerate(node_ids)
        }
        self.tamper = tamper
        # Flower's simulation gives each virtual client `client-resources-num-cpus` threads; the same
        # count here gives the same floating-point reductions, hence the same numbers as `flwr run`.
        self.client_threads = client_threads
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._next_id = 0
        self._queued: dict[str, Message] = {}  # pushed, not yet delivered
        self._pool = None
        self._running: dict[str, Any] = {}  # with a pool: message id -> its pending result
        if client_processes:  # spawned: torch's threads do not survive a fork
            self._pool = multiprocessing.get_context("spawn").Pool(
                client_processes, initializer=_start_client_process, initargs=(client_threads, app_dir))

    def close(self) -> None:
        """Stop the worker processes (a grid without a pool has none)."""
        if self._pool is not None:
            if self._running:  # work left (an interrupted run): stop it
                self._pool.terminate()
            else:  # let the workers exit on their own, which releases the pool's semaphores
                self._pool.close()
            self._pool.join()
            self._pool = None

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Queue messages; each is delivered (the ClientApp runs) when a pull asks for its reply."""
        ids = []
        for message in messages:
            self._next_id += 1
            message.metadata.__dict__["_message_id"] = f"m{self._next_id}"  # the SuperLink sets it
            self.sent.append(message)
            if self._pool is not None:  # runs now, in a worker process, with its node's context
                context = self.contexts[message.metadata.dst_node_id]
                self._running[message.metadata.message_id] = self._pool.apply_async(
                    _serve, (message, context))
            else:
                self._queued[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Without a pool: the reply to the first queued message among message_ids (one client runs
        per pull). With one: the replies of those among message_ids that have finished."""
        if self._pool is not None:
            return self._pull_finished(message_ids)
        for message_id in message_ids:
            if message_id in self._queued:
                reply = self._deliver(self._queued.pop(message_id))
                return [] if reply is None else [reply]
        return []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies: list[Message] = []
        for message_id in self.push_messages(messages):
            if self._pool is not None:
                self._running[message_id].wait()
            replies.extend(self.pull_messages([message_id]))
        return replies

    def _pull_finished(self, message_ids: Iterable[str]) -> list[Message]:
        replies = []
        for message_id in list(message_ids):
            pending = self._running.get(message_id)
            if pending is None or not pending.ready():
                continue
            del self._running[message_id]
            reply, node_id, state = pending.get()
            self.contexts[node_id].state = state  # what the client kept, as its SuperNode would
            if (reply := self._received(self.contexts[node_id], reply)) is not None:
                replies.append(reply)
        return replies

    def _deliver(self, message: Message) -> Message | None:
        context = self.contexts[message.metadata.dst_node_id]
        with _threads(self.client_threads):
            reply = _call_client(self.client_app, _copy(message), context)
        return self._received(context, reply)

    def _received(self, context: Context, reply: Message) -> Message | None:
        if self.tamper is not None:
            reply = self.tamper(int(context.node_config["partition-id"]), reply)
            if reply is None:
                return None
        self.replies.append(reply)
        return reply


def _call_client(client_app: Any, message: Message, context: Context) -> Message:
    try:
        return client_app(message, context)
    except Exception as err:  # noqa: BLE001 - Flower turns any ClientApp exception into an error reply
        return Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=message)


def _set_task_identity() -> None:
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


_worker_client_app: Any = None  # in a worker process: the ClientApp it serves


def _start_client_process(client_threads: int | None, app_dir: Path) -> None:
    global _worker_client_app
    _set_task_identity()
    if client_threads:
        torch.set_num_threads(client_threads)
    _worker_client_app = load_client_app(app_dir)


def _serve(message: Message, context: Context) -> tuple[Message, int, RecordDict]:
    """In a worker process: the ClientApp's reply, and the state its node keeps (the message and
    context arrive pickled, so nothing is shared with the server)."""
    reply = _call_client(_worker_client_app, message, context)
    return reply, message.metadata.dst_node_id, context.state


def run_in_process(run_config: Mapping[str, Any], num_nodes: int | None = None, *,
                   tamper: Tamper | None = None, client_threads: int | None = None,
                   client_processes: int | None = None,
                   app_dir: str | Path | None = None) -> tuple[InProcessGrid, Any]:
    """One whole run of the ServerApp (`server.app.run_server`, returning its `ServerRun`) over an
    in-process grid of num_nodes virtual clients (default: the config's federation.num_clients, as
    `fedsb run` starts); with `client_processes`, the clients run in that many worker processes.
    The apps come from `app_dir` (default: the project root), as `flwr run` takes them."""
    from fedsb.experiment.config import AUTO_CLIENTS
    from fedsb.experiment.run_config import from_run_config

    app_dir = Path(app_dir or project_dir()).resolve()
    run_server = load_server_runner(app_dir)
    if num_nodes is None:
        num_nodes = from_run_config(run_config, app_dir).with_clients(AUTO_CLIENTS).federation.num_clients
    grid = InProcessGrid(num_nodes, run_config, tamper=tamper, client_threads=client_threads,
                         client_processes=client_processes, app_dir=app_dir)
    try:
        return grid, run_server(grid, dict(run_config))
    finally:
        grid.close()


@contextmanager
def _threads(count: int | None):
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _copy(message: Message) -> Message:
    """The message as a client receives it: a copy, sharing nothing with the server's."""
    return Message(content=copy.deepcopy(message.content), metadata=copy.deepcopy(message.metadata))
