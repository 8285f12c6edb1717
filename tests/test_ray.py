"""Bulk indexing on Ray (local mode): the same images, ids, vectors and failures as a local run;
a killed driver's re-run indexes every good image exactly once; without Ray, one line saying how
to install it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from embedsearch.cli.main import main
from embedsearch.core.ray_bulk import INSTALL_HINT, EncodeFiles, RayOptions
from embedsearch.engine import Engine
from embedsearch.errors import ExtraNotInstalledError
from embedsearch.results import IndexReport
from helpers import index_entries, labelled_pngs, vector_library

#: Ray's start-up costs seconds: once per module, in local mode, on two CPUs (issue 15).
RAY_SETTINGS = {"num_cpus": 2, "object_store_memory": int(2e8), "include_dashboard": False}


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(address="local", log_to_driver=False, **RAY_SETTINGS)
    yield ray
    ray.shutdown()


@pytest.fixture
def messy(shapes: Path) -> Path:
    """``shapes`` with a broken file, an empty one and two copies of one picture."""
    (shapes / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (shapes / "empty.png").write_bytes(b"")
    for name in ("copy-a.png", "zz/copy-b.png"):
        (shapes / name).parent.mkdir(exist_ok=True)
        shutil.copy(shapes / "circle" / "circle-0002.png", shapes / name)
    return shapes


@pytest.fixture
def dbs(new_database: Any) -> dict[str, str | None]:
    """The local run's and the Ray run's libraries each need a database of their own (PostgreSQL)."""
    return {"local": new_database(), "ray": new_database()}


def _state(home: Path, models: list[str], db: str | None) -> dict[str, Any]:
    """What a library holds: path -> image id, and per model image id -> stored and indexed vector."""
    with Engine(home, db=db) as engine:
        paths = {path: image_id for image_id, _, path in engine.store.image_paths()}
        vectors = {}
        for name in models:
            model = engine.model(name)
            stored = {i: np.frombuffer(b, np.float32) for i, b in engine.store.entry_blobs(model.id)}
            indexed = engine.vector_index(name).vectors()
            assert sorted(indexed) == sorted(stored)
            vectors[name] = (stored, indexed)
    return {"paths": paths, "vectors": vectors}


def _same_vectors(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for image_id, vector in a.items():
        np.testing.assert_allclose(vector, b[image_id], rtol=1e-5, atol=1e-6)


def _counts(report: IndexReport) -> dict[str, Any]:
    """A report without its timings."""
    return {k: v for k, v in report.to_dict().items() if k not in ("seconds", "images_per_second")}


Reports = list[IndexReport]


def _index_both(
    tmp_path: Path, dbs: dict[str, str | None], data: Path, models: list[str], **kwargs: Any
) -> tuple[Reports, Reports]:
    reports = []
    for where, ray in (("local", None), ("ray", RayOptions(chunk=5))):  # chunks of 5: many calls, in order
        new = not (tmp_path / where).exists()
        with Engine(tmp_path / where, db=dbs[where]) as engine:
            if "pca" in models and new:
                # pixels on its own first (a model is made in a library), then both: every file is read
                # again for pca, and pixels' codes are shipped but not needed
                engine.index(str(data), "pixels", workers=2, ray=ray, **kwargs)
                engine.create_model("pca", "pca", str(data), options={"dim": 8})
            reports.append(engine.index_models(str(data), models, workers=2, ray=ray, **kwargs))
    return reports[0], reports[1]


@pytest.mark.slow
def test_ray_indexes_exactly_what_a_local_run_does(
    tmp_path: Path, dbs: dict[str, str | None], messy: Path, ray_local: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[int] = []  # files of the chunks the driver took itself while the actors started
    encode = EncodeFiles.encode  # the actors' processes import the module afresh: they are not counted
    monkeypatch.setattr(EncodeFiles, "encode", lambda self, files: taken.append(len(files)) or encode(self, files))
    local, on_ray = _index_both(tmp_path, dbs, messy, ["pixels", "pca"], batch_size=16)
    assert 0 < sum(taken) < 2 * local[0].scanned  # Ray's two runs were shared by the driver and the actors
    assert [_counts(r) for r in on_ray] == [_counts(r) for r in local]
    assert sorted(p for p, _ in local[0].failed) == [str(messy / "broken.png"), str(messy / "empty.png")]
    a = _state(tmp_path / "local", ["pixels", "pca"], dbs["local"])
    b = _state(tmp_path / "ray", ["pixels", "pca"], dbs["ray"])
    assert a["paths"] == b["paths"]  # same images, same ids
    for name in ("pixels", "pca"):
        for x, y in zip(a["vectors"][name], b["vectors"][name], strict=True):
            _same_vectors(x, y)
    assert ray_local.is_initialized()  # a Ray the caller started is left running


@pytest.mark.slow
def test_a_second_ray_run_finds_the_changes_a_local_one_finds(
    tmp_path: Path, dbs: dict[str, str | None], messy: Path, ray_local: Any
) -> None:
    _index_both(tmp_path, dbs, messy, ["pixels"])
    Image.new("RGB", (32, 32), (200, 10, 10)).save(messy / "circle" / "circle-0001.png")  # changed
    (messy / "zz" / "copy-b.png").unlink()
    Image.new("RGB", (32, 32), (0, 90, 10)).save(messy / "new.png")
    local, on_ray = _index_both(tmp_path, dbs, messy, ["pixels"])
    assert _counts(on_ray[0]) == _counts(local[0])
    assert (local[0].added, local[0].updated) == (1, 1)
    a, b = _state(tmp_path / "local", ["pixels"], dbs["local"]), _state(tmp_path / "ray", ["pixels"], dbs["ray"])
    assert a["paths"] == b["paths"]
    for x, y in zip(a["vectors"]["pixels"], b["vectors"]["pixels"], strict=True):
        _same_vectors(x, y)


N_GOOD = 2400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return labelled_pngs(tmp_path_factory.mktemp("ray-corpus"), N_GOOD, seed=5)


def _index_command(home: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "embedsearch", "-q", "--home", str(home), "index", str(data), "--model", "pixels",
            *extra]  # fmt: skip


def _run_and_kill(home: Path, data: Path, after_entries: int) -> bool:
    """``index --ray`` in a subprocess, SIGKILLed once ``after_entries`` are committed; True if it was."""
    proc = subprocess.Popen(_index_command(home, data, "--batch-size", "150", "--ray"), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if index_entries(home) >= after_entries:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    return proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.slow
def test_a_killed_ray_driver_then_a_rerun_indexes_every_good_image_once(tmp_path: Path, corpus: Path) -> None:
    home = tmp_path / "lib"
    killed, counts = [], []
    for after in (1, N_GOOD // 2):
        killed.append(_run_and_kill(home, corpus, after))
        counts.append(index_entries(home))
    assert any(killed), killed  # a run really died part-way ...
    assert 0 < counts[0] < N_GOOD, counts  # ... with part of the work committed
    final = subprocess.run(_index_command(home, corpus, "--ray", "--json"), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert '"bad.png"' in final.stdout or "bad.png" in final.stdout  # the failure is reported again
    with Engine(home) as engine:
        model = engine.model("pixels")
        db_ids = engine.store.entry_image_ids(model.id)
        assert len(db_ids) == len(set(db_ids)) == N_GOOD == engine.info().images
        assert sorted(engine.vector_index("pixels").ids().tolist()) == sorted(db_ids)


@pytest.mark.slow
def test_a_ray_the_run_started_is_shut_down_after_it_and_the_next_run_starts_its_own(
    tmp_path: Path, shapes: Path
) -> None:
    """Ray starts in a thread beside the run and shuts down there after it (issue 15's start-up
    costs): ``settle()`` waits for that shutdown (no thread or child process of it is left), and a
    second run in the process starts Ray afresh (a subprocess: no other test's Ray runs there)."""
    pytest.importorskip("ray")
    code = f"""
import glob, os, threading, ray
from pathlib import Path
from PIL import Image
from embedsearch.core.ray_bulk import RayOptions, settle
from embedsearch.engine import Engine
options, down = RayOptions(num_cpus=2, object_store_memory=int(2e8)), []
def children():
    found = []
    for task in glob.glob(f"/proc/{{os.getpid()}}/task/*/children"):
        try:
            found += Path(task).read_text().split()
        except FileNotFoundError:  # that thread ended between the listing and the read
            pass
    return found
with Engine({str(tmp_path / "h")!r}) as engine:
    for n in range(2):
        if n:
            Image.new("RGB", (32, 32), (0, 90, 10)).save({str(shapes / "new.png")!r})
        print(engine.index({str(shapes)!r}, "pixels", ray=options).added)
        settle()
        alive = [t.name for t in threading.enumerate() if t.name.startswith("embedsearch")]
        down.append(not ray.is_initialized() and not alive and not children())
print(down)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["48", "1", "[True, True]"]


def test_without_ray_the_ray_option_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, shapes: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what ``import ray`` does when it is not installed
    args = ["--home", str(tmp_path / "h"), "index", str(shapes), "--model", "pixels", "--ray"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: working on Ray needs Ray, which is not installed: {INSTALL_HINT}"
    ]
    with Engine(tmp_path / "h2") as engine, pytest.raises(ExtraNotInstalledError, match=r"embedsearch\[ray\]"):
        engine.index(str(shapes), "pixels", ray=RayOptions())
    CliRunner().invoke(main, ["--home", str(tmp_path / "h"), "index", str(shapes), "--model", "pixels"])
    reindex = ["--home", str(tmp_path / "h"), "reindex", "--model", "pixels", "--index", "ivf", "--shards", "2"]
    result = CliRunner().invoke(main, [*reindex, "--ray"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"Error: working on Ray needs Ray, which is not installed: {INSTALL_HINT}"
    ]
    with Engine(tmp_path / "h") as engine:
        assert engine.model("pixels").index_spec is None  # nothing was rebuilt: still the flat index


@pytest.mark.slow
def test_a_run_without_the_ray_option_never_imports_ray(shapes: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from embedsearch.cli.main import main\n"
        f"try: main(['-q', '--home', {str(tmp_path / 'h')!r}, 'index', {str(shapes)!r}, '--model', 'pixels'])\n"
        "except SystemExit as exc: assert not exc.code, exc.code\n"
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


@pytest.mark.slow
def test_a_sharded_reindex_on_ray_tasks_builds_the_index_one_process_builds(
    tmp_path: Path, new_database: Any, ray_local: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15.5: train once, add the shards as Ray tasks, merge; the same FAISS index byte for byte."""
    import faiss

    remote = ray_local.remote
    tasks: list[str] = []
    monkeypatch.setattr(ray_local, "remote", lambda *a, **k: tasks.append("remote") or remote(*a, **k))
    built = {}
    for shards, ray in ((1, None), (3, RayOptions())):
        with Engine(tmp_path / f"h{shards}", db=new_database()) as engine:
            vector_library(engine, 3000, dim=16, seed=4)
            result = engine.reindex("vecs", index="ivfpq", shards=shards, ray=ray, seed=1)
            assert result.shards == shards
            built[shards] = bytes(faiss.serialize_index(engine.vector_index("vecs").index))
    assert tasks == ["remote"]  # the sharded build made its Ray task (and the unsharded one none)
    assert built[3] == built[1]
