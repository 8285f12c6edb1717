"""Ctrl-C held back for the length of a block (a database transaction), then delivered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from embedsearch.interrupts import check, deferred, polled

pytestmark = [pytest.mark.no_store, pytest.mark.usefixtures("sigint_raises")]


def test_a_sigint_inside_the_block_waits_for_its_end_then_interrupts() -> None:
    ran = []
    with pytest.raises(KeyboardInterrupt), deferred():
        os.kill(os.getpid(), signal.SIGINT)
        ran.append("after the signal")  # not cut short
    assert ran == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_nested_blocks_deliver_once_at_the_outermost_end() -> None:
    ran = []
    with pytest.raises(KeyboardInterrupt), deferred():
        with deferred():
            os.kill(os.getpid(), signal.SIGINT)
        ran.append("inner block ended")  # the inner block did not deliver it
    assert ran == ["inner block ended"]


def test_without_a_signal_nothing_changes() -> None:
    with deferred():
        value = 1
    assert value == 1 and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_installed_handler_gets_the_held_back_signal() -> None:
    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: got.append(signum))
    try:
        with deferred():
            os.kill(os.getpid(), signal.SIGINT)
            assert got == []
        assert got == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_ignored_sigint_stays_ignored() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_other_threads_run_the_block_plainly() -> None:
    """Only the main thread gets signals (and may set handlers): elsewhere it is a no-op, no error."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with deferred():
                pass
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert errors == []


def test_in_a_polled_loop_ctrl_c_stops_it_at_the_next_check() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt), polled():
        for step in range(5):
            check()
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)
            done.append(step)  # the step that got the signal still finishes
    assert done == [0, 1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    check()  # outside a polled block: nothing to do


def test_a_second_ctrl_c_interrupts_a_polled_loop_at_once() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt), polled():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("asked")
        os.kill(os.getpid(), signal.SIGINT)
        done.append("never")
    assert done == ["asked"]


def test_a_transaction_inside_a_polled_loop_turns_ctrl_c_into_a_request() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt), polled():
        with deferred():
            os.kill(os.getpid(), signal.SIGINT)
        done.append("after the transaction")  # the loop decides when to stop
        check()
        done.append("never")
    assert done == ["after the transaction"]


def test_ctrl_c_that_escaped_generated_code_still_exits_130(tmp_path: Path) -> None:
    """A KeyboardInterrupt out of an exec() of a string (as dataclasses and SQLAlchemy generate code)
    makes CPython end a ``python -m`` process by SIGINT at exit even once handled: -2, not 130."""
    (tmp_path / "interrupted_cli.py").write_text(
        "import sys\n"
        "from embedsearch.cli.main import main\n"
        "from embedsearch.engine import Engine\n"
        "def interrupted(self, *args, **kwargs):\n"
        "    exec('raise KeyboardInterrupt')\n"
        "Engine.__init__ = interrupted\n"
        "main(['--home', sys.argv[1], 'info'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "interrupted_cli", str(tmp_path / "home")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert "interrupted; what was committed is kept" in done.stderr and "Traceback" not in done.stderr
