"""Ctrl-C campaign: SIGINT to ``index`` (its whole process group, as a terminal sends it) at random moments.

    .venv/bin/python benchmarks/interrupts.py [--runs 150] [--store sqlite|postgresql] [--busy] [--seed 0]

Each run indexes 2,400 small PNGs (plus one bad file) with 2 decoding workers into a new library
(on PostgreSQL a new database, on a throw-away cluster started as the tests start one) and gets
SIGINT at a seeded moment: 0.3-3 s after its start, as soon as its first batch is committed, or
0-0.3 s after that. A run passes if it ends within 60 s with exit 130 and "interrupted; what
was committed is kept", exit 0 (it had finished) or death by the signal itself (counted apart, see
one_run), printed no traceback, and ``check`` finds its library whole. ``--busy`` keeps
one core busy beside the runs, as on a loaded machine. Prints a line per failure and the count of
each outcome; exit status 1 on a failure.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import machine  # noqa: E402
from embedsearch.engine import Engine  # noqa: E402
from embedsearch.errors import EmbedSearchError  # noqa: E402
from helpers import admin_sql, database_url, labelled_pngs, postgres_server  # noqa: E402
from helpers import index_entries as entries  # noqa: E402

# A trampoline that restores SIGINT's default: a shell that started this in the background may have
# left SIGINT ignored, and Python keeps an ignored SIGINT ignored.
TRAMPOLINE = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


N_GOOD = 2400  # good images in the folder (plus one bad file)


def one_run(home: Path, data: Path, rng: np.random.Generator, mode: int) -> str:
    """Index ``data`` into a new library (on EMBEDSEARCH_DB if set), interrupt it; the outcome or "FAIL: why"."""
    args = ["-m", "embedsearch", "--home", str(home), "index", str(data), "--model", "pixels"]
    args += ["--batch-size", "150", "--workers", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAMPOLINE, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    if mode == 0:
        time.sleep(float(rng.uniform(0.3, 3.0)))
    else:
        deadline = time.monotonic() + 120
        while entries(home) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0, 0.3)) if mode == 2 else 0)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "FAIL: still running 60 s after the interrupt"
    if "Traceback" in err or "Exception ignored" in err:
        return "FAIL: traceback: " + err.strip().splitlines()[-1]
    said = "interrupted; what was committed is kept" in err
    outcome = {
        (130, True): "exit 130",
        (0, False): "exit 0 (finished first)",
        # Ending by the signal after the line was CPython's mark of an interrupt that escaped an
        # exec() (embedsearch/cli/main.py, _Group.main); without the line it is a signal that came
        # during Python's own shutdown. Counted apart, and a pass only if the library is whole.
        (-signal.SIGINT, True): "ended by the signal, after its line",
        (-signal.SIGINT, False): "ended by the signal, without its line",
    }.get((proc.returncode, said))
    if outcome is None:
        return f"FAIL: exit {proc.returncode}: " + (err.strip().splitlines() or [""])[-1]
    if (home / "library.db").exists() or os.environ.get("EMBEDSEARCH_DB"):
        try:
            with Engine(home, db=os.environ.get("EMBEDSEARCH_DB")) as engine:
                if not engine.check().ok:
                    return f"FAIL: {outcome}, but check is not ok"
        except EmbedSearchError as exc:  # interrupted before the library was made: nothing to check
            if entries(home):
                return f"FAIL: {outcome}, library unreadable: {exc}"
    return outcome


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy_core(on: bool) -> Iterator[None]:
    """One core kept busy by another process, for as long as the block runs."""
    if not on:
        yield
        return
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
    spinner.start()
    try:
        yield
    finally:
        spinner.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=150)
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="postgresql")
    parser.add_argument("--busy", action="store_true", help="keep one core busy beside the runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(machine(), f"| {args.runs} runs on {args.store}{', one core busy' if args.busy else ''}", flush=True)
    os.environ.pop("EMBEDSEARCH_DB", None)
    work = Path(tempfile.mkdtemp(prefix="embedsearch-interrupts-"))
    os.chmod(work, 0o755)  # the postgres user starts its cluster in here
    outcomes: Counter[str] = Counter()
    try:
        (work / "data").mkdir()
        data = labelled_pngs(work / "data", N_GOOD, seed=3)
        (work / "pg").mkdir()
        server = postgres_server(work / "pg") if args.store == "postgresql" else nullcontext(None)
        with server as url, busy_core(args.busy):
            for i in range(args.runs):
                if url is not None:  # the runs and index_entries() both read it from there
                    admin_sql(url, f"CREATE DATABASE interrupt_{i}")
                    os.environ["EMBEDSEARCH_DB"] = database_url(url, f"interrupt_{i}")
                outcome = one_run(work / f"home{i}", data, np.random.default_rng([args.seed, i]), i % 3)
                outcomes[outcome] += 1
                if "FAIL" in outcome:
                    print(f"run {i} (mode {i % 3}): {outcome}", flush=True)
                shutil.rmtree(work / f"home{i}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for outcome, count in sorted(outcomes.items()):
        print(f"{count:5d}  {outcome}")
    sys.exit(1 if any("FAIL" in o for o in outcomes) else 0)


if __name__ == "__main__":
    main()
