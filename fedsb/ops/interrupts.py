"""Ctrl-C and SIGTERM as an exception, so that the clean-up of whatever was started runs.

Python's default SIGTERM ends the process at once: no `finally`, no context manager's exit, so
the SuperLink, its SuperExec, the simulation and Ray's processes of a `fedsb run` or `fedsb sweep`
would be left running. Inside `handle_interrupts()` (installed by `fedsb run`, `fedsb sweep` and
`fedsb deploy-local` around their work):

- the first SIGINT or SIGTERM raises `Interrupted` (a KeyboardInterrupt, so `except Exception`
  does not swallow it) where the main thread is; its `exit_status` is 128 + the signal number
  (130 for SIGINT, 143 for SIGTERM);
- inside a `deferred()` block (the clean-up itself: stopping a run, stopping process groups) a
  signal is held and raised when the block ends, so it cannot cut the clean-up short;
- once one has been raised, later signals are reported and ignored: the clean-up already under
  way finishes (SIGKILL of the fedsb process remains the way to stop it at once).

Without `handle_interrupts()` (fedsb used as a library) nothing changes: `deferred()` is a plain
block and Python's own SIGINT handling applies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM received inside `handle_interrupts()`."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(signal_name(self.signum))

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_status(err: BaseException) -> int:
    """The exit status of a command stopped by `err`: 128 + its signal number (130: SIGINT, the
    signal of a plain KeyboardInterrupt)."""
    return 128 + int(getattr(err, "signum", signal.SIGINT))


class _State:
    installed = 0  # nesting depth of handle_interrupts()
    deferring = 0  # nesting depth of deferred()
    pending: int | None = None  # a signal held by deferred()
    raised = False  # an Interrupted has been raised: later signals are only reported


def _say(text: str) -> None:
    # os.write, not print: a handler may run while the main thread is inside a print to stderr
    with contextlib.suppress(OSError):
        os.write(2, f"fedsb: {text}\n".encode())


def _handler(signum: int, _frame: object) -> None:
    if _State.raised or _State.pending is not None:
        _say(f"{signal_name(signum)} received again: still stopping the processes it started")
        return
    if _State.deferring:
        _State.pending = signum
        _say(f"{signal_name(signum)} received: stopping once the clean-up under way is done")
        return
    _State.raised = True
    _say(f"{signal_name(signum)} received: stopping every process it started")
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_interrupts() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise `Interrupted` (see the module docstring).
    Nested use is one installation; outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _State.installed:
        _State.installed += 1
        try:
            yield
        finally:
            _State.installed -= 1
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _State.installed, _State.deferring, _State.pending, _State.raised = 1, 0, None, False
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _State.installed, _State.deferring, _State.pending, _State.raised = 0, 0, None, False


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Clean-up that a signal must not interrupt: a signal received inside is raised as
    `Interrupted` when the outermost such block ends (unless one was raised already)."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
        if _State.deferring == 0 and _State.pending is not None and not _State.raised:
            signum, _State.pending = _State.pending, None
            _State.raised = True
            raise Interrupted(signum)
