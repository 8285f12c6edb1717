"""Ctrl-C at safe points: between database transactions, and between the files of a bulk run.

Python raises KeyboardInterrupt at whatever bytecode the main thread is running, and some places
cannot take it. Inside a driver's exchange with the server (psycopg's pipelined ``executemany``
above all) it leaves the connection mid-protocol: the rollback on the way out fails with "cannot
exit pipeline mode while busy", or an assertion trips. Inside the lock handling
that the logging module runs around ``fork`` it is swallowed ("Exception ignored in
_releaseLock"), and the run goes on. benchmarks/interrupts.py met each about once in 40-110
interrupted PostgreSQL runs (README, Reliability; the hang of the decoding pool that it also
found is mended in ``embedsearch.data.ingest``). So:

* :func:`deferred` holds SIGINT back for a block (every database transaction) and hands it on, to
  the handler that was installed, when the outermost block ends: a transaction commits whole or
  never starts. Transactions here are bounded (one batch of a bulk run at most).
* :func:`polled` turns SIGINT into a request for a long loop (a bulk run): the loop stops at its
  next :func:`check`, which raises KeyboardInterrupt there. A second Ctrl-C interrupts at once,
  for a user who will not wait.

Both do nothing outside the main thread: Python runs signal handlers there only.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

_depth = 0  # nesting of deferred() blocks in the main thread


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _handled(handler: Any) -> bool:
    """Whether SIGINT's handler is one to stand in for: not ignored, not set from outside Python."""
    return handler not in (signal.SIG_IGN, None)


@contextmanager
def deferred() -> Iterator[None]:
    """Run the block with SIGINT held back; deliver it, if one came, when the outermost block ends."""
    global _depth
    if not _main_thread():
        yield
        return
    if _depth:  # an outer block holds the signal back and delivers it
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    previous = signal.getsignal(signal.SIGINT)
    if not _handled(previous):
        yield
        return
    noted: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: noted.append(signum))
    _depth = 1
    try:
        yield
    finally:
        _depth = 0
        signal.signal(signal.SIGINT, previous)
        if noted:
            _deliver(previous)


class _Request:
    """The SIGINT handler of a :func:`polled` block: the first signal is noted, the next one delivered."""

    def __init__(self, previous: Callable[[int, FrameType | None], Any] | int) -> None:
        self.previous = previous
        self.asked = False

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        if self.asked:
            _deliver(self.previous)
        self.asked = True


_request: _Request | None = None  # the polled() block running in the main thread


@contextmanager
def polled() -> Iterator[None]:
    """Run a loop that calls :func:`check` often; Ctrl-C makes the next check raise KeyboardInterrupt."""
    global _request
    previous = signal.getsignal(signal.SIGINT) if _main_thread() else None
    if _request is not None or previous is None or not _handled(previous):
        yield
        return
    request = _request = _Request(previous)
    signal.signal(signal.SIGINT, request)
    try:
        yield
    finally:
        _request = None
        signal.signal(signal.SIGINT, previous)


def check() -> None:
    """Raise KeyboardInterrupt (through the handler that was installed) if Ctrl-C asked a polled loop to stop."""
    request = _request
    if request is not None and request.asked and _main_thread():
        request.asked = False
        _deliver(request.previous)


def _deliver(handler: object) -> None:
    """Hand a held-back SIGINT to ``handler``, as the signal itself would have."""
    if callable(handler):
        handler(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)  # the default action: the process ends
