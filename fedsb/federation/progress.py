"""A Grid wrapper that reports a round's progress while the clients work.

Flower's `send_and_receive` is silent until every reply is in (or the timeout passes); on a real
model one round can take many minutes. `ProgressGrid` sends through the wrapped grid's
`push_messages` and collects with `pull_messages`, as Flower's own grids do, and logs how many of
the cohort have replied, with an estimate of the time left, at most every `interval_s` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

# Between pulls that returned nothing: from POLL_MIN_S, growing by POLL_GROWTH to POLL_MAX_S, and back
# to POLL_MIN_S after a pull that brought replies. A fixed 0.5 s cost each exchange 0.25 s on average
# after its last reply (a round of a small simulation takes a few seconds); backing off while nothing
# comes keeps a deployment's SuperLink from being asked 100 times a second through a long round.
POLL_MIN_S = 0.01
POLL_MAX_S = 0.5
POLL_GROWTH = 1.5


class ProgressGrid:
    """Delegates to `grid`; `send_and_receive` logs progress (and is otherwise Flower's)."""

    def __init__(self, grid: Grid, log: Callable[[str], None], interval_s: float = 30.0):
        self.grid = grid
        self.log = log
        self.interval_s = interval_s

    def __getattr__(self, name: str):
        return getattr(self.grid, name)  # get_node_ids, push_messages, pull_messages, ...

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        what = f"round {messages[0].metadata.group_id or '?'} {messages[0].metadata.message_type}"
        pending = set(self.grid.push_messages(messages))
        total, replies = len(pending), []
        start = last_line = time.monotonic()
        deadline = None if timeout is None else start + timeout
        pause = POLL_MIN_S
        while pending and (deadline is None or time.monotonic() < deadline):
            pulled = list(self.grid.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
            now = time.monotonic()
            if pending and now - last_line >= self.interval_s:
                self.log(progress_line(what, total - len(pending), total, now - start))
                last_line = now
            if pulled:
                pause = POLL_MIN_S
            elif pending:
                time.sleep(pause)
                pause = min(pause * POLL_GROWTH, POLL_MAX_S)
        return replies


def progress_line(what: str, done: int, total: int, elapsed_s: float) -> str:
    """'round 3 train: 5 of 8 clients replied in 120 s; about 72 s left' (a linear estimate)."""
    line = f"{what}: {done} of {total} clients replied in {elapsed_s:.0f} s"
    if done:
        line += f"; about {elapsed_s / done * (total - done):.0f} s left"
    return line
