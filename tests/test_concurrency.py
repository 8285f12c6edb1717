"""Several writers and readers on one library: two ``index`` processes, and searches during an index.

The library's writer lock (``HOME/library.lock``) makes a second writer wait, saying so on stderr;
whatever the interleaving, every image ends up indexed exactly once and ``check`` finds nothing.
Where a test needs a writer to be waiting for certain, the test itself holds the lock.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from filelock import FileLock
from PIL import Image

from embedsearch.core.database import writer_lock_for
from embedsearch.core.vectors import VectorIndex
from embedsearch.engine import Engine

#: Every test here runs on both metadata stores (conftest.py: ``database``).
pytestmark = pytest.mark.slow

WAITING = "another process is writing to"


def noise_folder(root: Path, n: int, seed: int, size: int = 16) -> list[Path]:
    """``n`` distinct grey noise PNGs in two label folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, arr in enumerate(rng.integers(0, 256, (n, size, size), dtype=np.uint8)):
        path = root / f"class{i % 2}" / f"{seed}-{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, "L").save(path)
        paths.append(path)
    return paths


def other_writer(home: Path) -> Any:
    """The library's writer lock as another process takes it: the database's advisory lock on
    PostgreSQL (conftest.py's ``database`` sets EMBEDSEARCH_DB), the home's lock file on SQLite."""
    url = os.environ.get("EMBEDSEARCH_DB")
    return writer_lock_for(url) if url else FileLock(str(home / "library.lock"))


def new_library(home: Path) -> None:
    with Engine(home) as engine:
        engine.create_model("pixels", "pixels", image_size=16, channels=1)


def start_index(home: Path, data: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "embedsearch",
        "--home",
        str(home),
        "index",
        str(data),
        "--model",
        "pixels",
        "--batch-size",
        "64",
        "--json",
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"))


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def finish(proc: subprocess.Popen[bytes], log: Path) -> dict:
    out, _ = proc.communicate(timeout=120)
    err = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in err, err
    return json.loads(out)


def assert_consistent(home: Path, contents: set[bytes]) -> None:
    """check is clean (no problems, no notes); the DB's entries and the index file on disk hold the
    same ids, once each; and the library holds exactly one image per distinct content."""
    with Engine(home) as engine:
        report = engine.check()
        assert report.ok and not report.notes, (report.problems, report.notes)
        model = engine.model("pixels")
        ids = engine.store.entry_image_ids(model.id)
        assert len(ids) == len(set(ids)) == len(contents) == engine.info().images
        on_disk = VectorIndex.load(engine.index_path("pixels"), model.dim, model.metric)
        assert sorted(on_disk.ids().tolist()) == sorted(ids)  # the file is complete, no catching up
        stored = {Path(row.path).read_bytes() for row in engine.store.images(ids).values()}
    assert stored == contents


def test_two_index_processes_wait_for_each_other_and_lose_nothing(tmp_path: Path) -> None:
    """Both start while a writer holds the library: both wait (and say so), then both complete."""
    a = noise_folder(tmp_path / "a", 300, seed=1)
    b = noise_folder(tmp_path / "b", 280, seed=2)
    for i, src in enumerate(a[:20]):  # B also holds 20 of A's images under other names
        shutil.copy(src, tmp_path / "b" / "class0" / f"copy-{i}.png")
    home = tmp_path / "home"
    new_library(home)
    lock = other_writer(home)
    lock.acquire()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    try:
        procs = [start_index(home, tmp_path / "a", logs[0]), start_index(home, tmp_path / "b", logs[1])]
        for log in logs:
            wait_for(lambda log=log: WAITING in log.read_text(), what=f"the waiting message in {log.name}")
        assert all(p.poll() is None for p in procs)  # still waiting: nothing indexed behind the lock
    finally:
        lock.release()
    reports = [finish(p, log) for p, log in zip(procs, logs, strict=False)]
    for log in logs:
        assert f"{WAITING} {home}" in log.read_text()
    assert reports[0]["scanned"] == 300 and reports[1]["scanned"] == 300
    assert all(r["failed"] == [] for r in reports)
    # Whichever ran first added all of its folder; the other found the 20 shared images stored.
    assert sorted(r["duplicates"] for r in reports) == [0, 20]
    assert sum(r["added"] for r in reports) == 580
    assert_consistent(home, {p.read_bytes() for p in a + b})


def test_two_index_processes_on_the_same_folder_index_it_once(tmp_path: Path) -> None:
    """Started together with nobody holding the lock: one indexes everything, the other finds it done."""
    paths = noise_folder(tmp_path / "data", 400, seed=3)
    home = tmp_path / "home"
    new_library(home)
    logs = [tmp_path / "1.log", tmp_path / "2.log"]
    procs = [start_index(home, tmp_path / "data", log, "--workers", "0") for log in logs]
    reports = [finish(p, log) for p, log in zip(procs, logs, strict=False)]
    assert sorted((r["added"], r["unchanged"]) for r in reports) == [(0, 400), (400, 0)]
    waited = [WAITING in log.read_text() for log in logs]
    assert sum(waited) <= 1  # if the runs overlapped, only the second one waited
    assert_consistent(home, {p.read_bytes() for p in paths})


def test_index_run_that_waited_to_create_the_model_keeps_what_another_run_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'index --model pixels' on a library without the model, while another run creates it and indexes:
    the waiting run must use that model, not replace it (which would drop what the other run indexed)."""
    a = noise_folder(tmp_path / "a", 60, seed=4)
    b = noise_folder(tmp_path / "b", 60, seed=5)
    home = tmp_path / "home"
    Engine(home, create=True).close()  # a library without the pixels model: 'index --model pixels' will create it
    log = tmp_path / "b.log"
    # The first run (this test) takes the writer lock before the second run starts, and then, while
    # the second run waits for it, creates the model and indexes A in the same locked block.
    with Engine(home) as engine, engine.cache.writing():
        proc = start_index(home, tmp_path / "b", log)
        wait_for(lambda: WAITING in log.read_text(), what="the second run to wait")
        assert engine.index(str(tmp_path / "a"), "pixels").added == 60
    finish(proc, log)
    assert_consistent(home, {p.read_bytes() for p in a + b})


def _open_library(
    home: str, db: str | None, go: multiprocessing.synchronize.Event, results: multiprocessing.Queue
) -> None:
    go.wait()
    try:
        Engine(home, db=db, create=True).close()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 (the parent reports it)
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_library_at_once_all_succeed(
    tmp_path: Path, new_database: Callable[[], str | None]
) -> None:
    """No 'table images already exists' when several processes create the schema at the same moment
    (on PostgreSQL: 'alembic_version already exists', until migrations took an advisory lock)."""
    ctx = multiprocessing.get_context("fork")
    for trial in range(4):  # each trial races three processes (unguarded migrations lost ~9 trials in 10)
        home = tmp_path / f"home{trial}"
        home.mkdir()
        go, results, db = ctx.Event(), ctx.Queue(), new_database()  # a new, empty database each trial
        procs = [ctx.Process(target=_open_library, args=(str(home), db, go, results)) for _ in range(3)]
        for proc in procs:
            proc.start()
        time.sleep(0.2)
        go.set()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        assert outcomes == ["ok"] * 3, outcomes


def test_a_library_whose_creation_died_half_way_opens_afterwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill while the schema is created must not leave tables without their alembic version."""
    from alembic import op

    create_table = op.create_table
    calls = []

    def dies_on_the_second_table(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill half-way through creating the schema")
        return create_table(*args, **kwargs)

    monkeypatch.setattr(op, "create_table", dies_on_the_second_table)
    with pytest.raises(KeyboardInterrupt):
        Engine(tmp_path / "home", create=True)
    monkeypatch.undo()
    with Engine(tmp_path / "home") as engine:  # the half-made schema was rolled back, or is completed now
        engine.create_model("pixels", "pixels", image_size=8, channels=1)
        assert [m.name for m in engine.models()] == ["pixels"]


def test_searches_during_an_index_run_are_well_formed(tmp_path: Path) -> None:
    """One thread bulk-indexes (with worker processes) while three threads search the same Engine."""
    first = noise_folder(tmp_path / "first", 100, seed=6)
    later = noise_folder(tmp_path / "later", 1600, seed=7)  # above POOL_THRESHOLD: decoded by a pool
    queries = [p.read_bytes() for p in first[:20]] + [p.read_bytes() for p in later[::80]]
    with Engine(tmp_path / "home") as engine:
        engine.create_model("pixels", "pixels", image_size=16, channels=1)
        engine.index(str(tmp_path / "first"), "pixels")
        known = {str(p) for p in first} | {str(p) for p in later}
        done = threading.Event()
        errors: list[BaseException] = []
        counts = {"searches": 0, "during": 0}

        def index() -> None:
            try:
                report = engine.index(str(tmp_path / "later"), "pixels", batch_size=100, workers=2)
                assert report.added == 1600 and report.failed == []
            except BaseException as exc:  # noqa: BLE001 (re-raised by the main thread)
                errors.append(exc)
            finally:
                done.set()

        def search(seed: int) -> None:
            rng = random.Random(seed)
            try:
                while True:
                    finished = done.is_set()
                    i = rng.randrange(len(queries))
                    hits = engine.search_bytes(queries[i], "pixels", k=5)
                    counts["searches"] += 1
                    counts["during"] += not finished
                    assert len(hits) == 5  # at least the 100 images of 'first' are always there
                    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
                    dist = [h.distance for h in hits]
                    assert all(np.isfinite(dist)) and dist == sorted(dist)
                    assert len({h.id for h in hits}) == len(hits) and all(h.path in known for h in hits)
                    if i < 20:  # an image indexed before the run finds itself first, always
                        assert hits[0].path == str(first[i]) and hits[0].distance == pytest.approx(0.0, abs=1e-5)
                    if finished:
                        break
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=index)] + [threading.Thread(target=search, args=(s,)) for s in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        if errors:
            raise errors[0]
        assert counts["during"] >= 10, counts  # the searches really ran while the index was being written
        # After the run every image finds itself first.
        for data in queries:
            assert engine.search_bytes(data, "pixels", k=1)[0].distance == pytest.approx(0.0, abs=1e-5)
    assert_consistent(tmp_path / "home", {p.read_bytes() for p in first + later})


def test_threads_of_one_process_wait_for_each_other_without_blaming_another_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from embedsearch.core.layout import WriterLock

    lock = WriterLock(tmp_path / "library.lock", inner=other_writer(tmp_path))
    order: list[str] = []
    with lock.hold():
        waiter = threading.Thread(target=lambda: (lock.acquire(), order.append("second"), lock.release()))
        waiter.start()
        time.sleep(0.2)
        order.append("first")
        with lock.hold():  # re-entrant in the holding thread
            assert lock.depth == 2
    waiter.join(timeout=10)
    assert order == ["first", "second"]
    assert "another process" not in caplog.text
    other = other_writer(tmp_path)  # another process, in effect: this one is told so
    other.acquire()
    try:
        assert not lock.try_acquire()
    finally:
        other.release()


def test_writers_with_different_homes_on_one_postgresql_database_wait_for_each_other(
    tmp_path: Path, database: str | None
) -> None:
    """Writers on several machines share a PostgreSQL database, each with its own home (its FAISS
    files and lock file): the database's advisory lock makes the second wait, and each home's index
    catches up with what the other wrote."""
    if database is None:
        pytest.skip("SQLite libraries are one file in one home: homes share nothing to wait for")
    a = noise_folder(tmp_path / "a", 120, seed=7)
    b = noise_folder(tmp_path / "b", 80, seed=8)
    first, second = tmp_path / "machine1", tmp_path / "machine2"
    new_library(first)
    log = tmp_path / "b.log"
    with Engine(first) as engine, engine.cache.writing():  # machine 1 is writing
        proc = start_index(second, tmp_path / "b", log)  # machine 2, its own home
        wait_for(lambda: WAITING in log.read_text(), what="machine 2's waiting message")
        engine.index(str(tmp_path / "a"), "pixels")
        assert proc.poll() is None  # still waiting: nothing of B was written behind the lock
    report = finish(proc, log)
    assert (report["added"], report["failed"]) == (80, [])
    for home in (first, second):
        with Engine(home) as engine:  # each home's index file catches up from the database
            assert len(engine.vector_index("pixels")) == 200
    assert_consistent(second, {p.read_bytes() for p in a + b})
