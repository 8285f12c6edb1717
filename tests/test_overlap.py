"""Overlap: work on a thread, results handed on in order, failures stop the hand-on."""

from __future__ import annotations

import threading

import pytest

from embedsearch.core.overlap import Overlap


def test_results_are_handed_on_in_order_and_work_runs_on_another_thread() -> None:
    seen: list[tuple[int, int]] = []
    threads: set[int] = set()

    def work(n: int) -> int:
        threads.add(threading.get_ident())
        return n * n

    with Overlap(work, lambda n, r: seen.append((n, r))) as overlap:
        for n in range(5):
            overlap.submit(n)
            assert len(seen) == n  # the previous batch is handed on when the next is submitted
        overlap.close()
    assert seen == [(n, n * n) for n in range(5)]
    assert threading.get_ident() not in threads


def test_a_failure_in_work_stops_everything_after_it() -> None:
    seen: list[int] = []

    def work(n: int) -> int:
        if n == 2:
            raise ValueError("batch 2 is bad")
        return n

    with pytest.raises(ValueError, match="batch 2"), Overlap(work, lambda n, r: seen.append(n)) as overlap:
        for n in range(5):
            overlap.submit(n)
        overlap.close()
    assert seen == [0, 1]


def test_when_the_caller_fails_the_submitted_batches_are_still_handed_on() -> None:
    seen: list[int] = []
    with pytest.raises(RuntimeError, match="routing"), Overlap(lambda n: n, lambda n, r: seen.append(n)) as overlap:
        overlap.submit(0)
        overlap.submit(1)
        raise RuntimeError("routing went wrong")
    assert seen == [0, 1]


def test_ctrl_c_hands_nothing_more_on() -> None:
    seen: list[int] = []
    with pytest.raises(KeyboardInterrupt), Overlap(lambda n: n, lambda n, r: seen.append(n)) as overlap:
        overlap.submit(0)
        overlap.submit(1)
        raise KeyboardInterrupt
    assert seen == [0]
