"""A bulk run killed with SIGKILL at any moment, then run again, indexes every good image exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedsearch.engine import Engine
from helpers import index_entries as entries
from helpers import labelled_pngs

#: Every test here runs on both metadata stores (conftest.py: ``database``).
pytestmark = pytest.mark.slow

N_GOOD = 2400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = labelled_pngs(tmp_path_factory.mktemp("crash-corpus"), N_GOOD, seed=3)
    (root / "empty.jpg").write_bytes(b"")
    return root


def run_index(home: Path, data: Path, kill_after_entries: int | None, kill_after_s: float | None) -> bool:
    """Run a bulk index; True if it was killed before it finished."""
    cmd = [
        sys.executable,
        "-m",
        "embedsearch",
        "-q",
        "--home",
        str(home),
        "index",
        str(data),
        "--model",
        "pixels",
        "--batch-size",
        "150",
        "--workers",
        "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = time.monotonic()
    while proc.poll() is None:
        waited = time.monotonic() - started
        if (kill_after_entries is not None and entries(home) >= kill_after_entries) or (
            kill_after_s is not None and waited >= kill_after_s
        ):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    return proc.wait(timeout=120) == -signal.SIGKILL


def test_kill_and_rerun_indexes_every_good_image_exactly_once(tmp_path: Path, corpus: Path) -> None:
    home = tmp_path / "lib"
    rng = np.random.default_rng(0)
    kills = [(1, None), (N_GOOD // 2, None), (None, float(rng.uniform(0.2, 2.0))), (N_GOOD - 300, None)]
    killed, counts = [], []
    for after_entries, after_s in kills:
        killed.append(run_index(home, corpus, after_entries, after_s))
        counts.append(entries(home))
    assert sum(killed) >= 3, killed  # the runs really died part-way ...
    assert 0 < counts[0] < counts[1] < N_GOOD, counts  # ... with part of the work committed
    final = subprocess.run(
        [sys.executable, "-m", "embedsearch", "--home", str(home), "index", str(corpus), "--model", "pixels", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert final.returncode == 0, final.stderr
    with Engine(home) as engine:
        model = engine.model("pixels")
        db_ids = engine.store.entry_image_ids(model.id)
        assert len(db_ids) == len(set(db_ids)) == N_GOOD == engine.info().images
        index_ids = engine.vector_index("pixels").ids()
        assert sorted(index_ids.tolist()) == sorted(db_ids)  # FAISS and metadata agree, no duplicates
        # and the index file on disk agrees too, without any catching up
        from embedsearch.core.vectors import VectorIndex

        on_disk = VectorIndex.load(engine.index_path("pixels"), model.dim, model.metric)
        assert sorted(on_disk.ids().tolist()) == sorted(db_ids)


def test_ctrl_c_during_a_pooled_run_stops_it_cleanly_and_keeps_what_was_committed(tmp_path: Path, corpus: Path) -> None:
    """SIGINT to the whole process group (what Ctrl-C in a terminal sends), with decoding workers."""
    home = tmp_path / "lib"
    args = [
        "-m",
        "embedsearch",
        "--home",
        str(home),
        "index",
        str(corpus),
        "--model",
        "pixels",
        "--batch-size",
        "150",
        "--workers",
        "2",
    ]
    # Through a trampoline that restores SIGINT's default: a shell that started pytest in the
    # background may have left SIGINT ignored, and Python keeps an ignored SIGINT ignored.
    trampoline = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", trampoline, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while entries(home) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    kept = entries(home)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert proc.returncode == 130, err
    assert "interrupted; what was committed is kept" in err
    assert "Traceback" not in err and "PoolWorker" not in err, err
    assert 0 < kept < N_GOOD
    with Engine(home) as engine:
        assert engine.check().ok
        assert engine.index(str(corpus), "pixels").added == N_GOOD - kept


def _proc_text(name: str) -> str:
    """A /proc file's text, or "" once that process or thread is gone (it may end between two reads)."""
    try:
        return Path(f"/proc/{name}").read_text()
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_sigkill_of_a_pooled_run_takes_its_workers_along_without_tracebacks(tmp_path: Path, corpus: Path) -> None:
    home = tmp_path / "lib"
    cmd = [
        sys.executable,
        "-m",
        "embedsearch",
        "--home",
        str(home),
        "index",
        str(corpus),
        "--model",
        "pixels",
        "--batch-size",
        "150",
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    children: list[str] = []
    deadline = time.monotonic() + 120
    while entries(home) == 0 and proc.poll() is None and time.monotonic() < deadline:
        children = _proc_text(f"{proc.pid}/task/{proc.pid}/children").split() or children
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("the run finished before the kill")
    assert len(children) == 2  # the decoding workers
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    time.sleep(0.5)
    alive = [c for c in children if _proc_text(f"{c}/stat").rsplit(")", 1)[-1].split()[:1] not in ([], ["Z"])]
    assert alive == [] and "Traceback" not in err, err
