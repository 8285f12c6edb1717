"""One step of a batch on a thread while the caller gets the next batch ready, results kept in order.

A bulk run's parent process routes decoded files and commits them; for a neural model, encoding
a batch costs more than both. With encoding on its own thread (torch releases the interpreter
lock inside its operators), the parent routes the next batch and commits the previous one while
the network runs, and the second core does not sit idle while one thread of torch works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

B = TypeVar("B")
R = TypeVar("R")


class Overlap(Generic[B, R]):
    """``submit(batch)`` starts ``work(batch)`` on the thread and hands the previous batch and its
    result to ``then`` (in the caller's thread, in submission order); ``close`` finishes the last one.

    At most two batches are in flight: the one being worked on and the one whose result waits for
    ``then``. An exception in ``work`` or ``then`` is raised by the ``submit`` or ``close`` that
    handed the batch on, and the pending work is dropped. When the caller's own code fails inside
    the ``with`` block (an Exception, not Ctrl+C), the batches already submitted are still handed
    on, as they would have been without the thread.
    """

    def __init__(self, work: Callable[[B], R], then: Callable[[B, R], None]) -> None:
        self.work, self.then = work, then
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedsearch-encode")
        self.pending: tuple[B, Future[R]] | None = None
        self.failed = False  # work or then raised: hand nothing more on

    def submit(self, batch: B) -> None:
        previous, self.pending = self.pending, (batch, self.pool.submit(self.work, batch))
        if previous is not None:
            self._hand_on(previous)

    def close(self) -> None:
        """Hand on the last batch's result and stop the thread."""
        try:
            if self.pending is not None:
                last, self.pending = self.pending, None
                self._hand_on(last)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Drop pending work (a failed or interrupted run): wait only for what the thread is running."""
        self.pending = None
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _hand_on(self, item: tuple[B, Future[R]]) -> None:
        batch, future = item
        try:
            self.then(batch, future.result())
        except BaseException:
            self.failed = True
            self.abandon()
            raise

    def __enter__(self) -> Overlap[B, R]:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None and issubclass(kind, Exception) and not self.failed:
            try:
                self.close()  # the caller failed, not the batches: commit what was submitted
            except Exception:  # the caller's error is the one to report
                log.warning("could not finish the batches submitted before the failure", exc_info=True)
        self.abandon()
