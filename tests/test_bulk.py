"""A folder that changes between bulk runs: copies, renames, swaps and rewrites of its files.

The invariant after every run: each distinct content on disk is stored exactly once, at a path
that holds it, and is in the index; a stored image whose path still exists has that file's content;
a second run changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedsearch.engine import Engine
from embedsearch.results import QueryResult
from helpers import noise_image, png_bytes

#: Every test here runs on both metadata stores (conftest.py: ``database``).


@pytest.mark.parametrize("original, copy", [("a.png", "b.png"), ("b.png", "a.png")])
def test_copy_of_a_file_that_changed_is_kept(tmp_path: Path, original: str, copy: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / original).write_bytes(png_bytes(noise_image(1)))
    with Engine(tmp_path / "home") as engine:
        assert engine.index(str(data), "pixels").added == 1
        (data / copy).write_bytes(png_bytes(noise_image(1)))  # a copy: a duplicate of the stored image
        (data / original).write_bytes(png_bytes(noise_image(2)))  # the original changes in the same run
        second = engine.index(str(data), "pixels")
        assert second.duplicates == 0
        ids = engine.store.entry_image_ids(engine.model("pixels").id)
        stored = {row.sha256 for row in engine.store.images(ids).values()}
        on_disk = {hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir()}
        assert stored == on_disk, f"second run: updated {second.updated}, duplicates {second.duplicates}"


def _contents_agree(engine: Engine, data: Path) -> None:
    """One stored image per distinct content on disk, each at a path that holds that content, each
    indexed, and each file's query finds itself (or its stored twin) at distance 0."""
    rows = engine.store.images_under(str(data.resolve()))
    on_disk = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir()}
    assert sorted(r.sha256 for r in rows) == sorted(set(on_disk.values()))
    for row in rows:
        assert on_disk[Path(row.path)] == row.sha256
    assert sorted(engine.store.entry_image_ids(engine.model("pixels").id)) == sorted(r.id for r in rows)
    for result in engine.query([str(p) for p in sorted(on_disk)], "pixels", k=1):
        assert isinstance(result, QueryResult) and result.results[0].distance == 0.0
        assert on_disk[Path(result.results[0].path)] == on_disk[Path(result.query)]


@pytest.mark.parametrize("batch_size", [2048, 1], ids=["one-batch", "batch-per-file"])
@pytest.mark.parametrize(
    "moves",
    [
        pytest.param({"a": "b", "b": "a"}, id="swap"),
        pytest.param({"a": "b", "b": "c", "c": "a"}, id="rotate-3"),
        pytest.param({"b": "a", "a": "b"}, id="swap-reversed"),
        pytest.param({"a": "b", "b": "x"}, id="rename-chain-to-new-name"),
        pytest.param({"a": "z"}, id="rename"),
        pytest.param({"a": "0", "c": "a"}, id="rename-onto-a-path-whose-content-moved-first"),
    ],
)
def test_files_that_exchange_contents_stay_indexed_once_each(
    tmp_path: Path, moves: dict[str, str], batch_size: int
) -> None:
    """Renames that move content between known paths (a swap through a temporary name, a rotation)."""
    data = tmp_path / "data"
    data.mkdir()
    for i, name in enumerate("abcd"):
        (data / f"{name}.png").write_bytes(png_bytes(noise_image(10 + i)))
    with Engine(tmp_path / "home") as engine:
        assert engine.index(str(data), "pixels").added == 4
        contents = {src: (data / f"{src}.png").read_bytes() for src in moves}
        for src in moves:
            (data / f"{src}.png").unlink()
        for src, dst in moves.items():
            (data / f"{dst}.png").write_bytes(contents[src])
        report = engine.index(str(data), "pixels", batch_size=batch_size)
        assert report.failed == []
        _contents_agree(engine, data)
        assert engine.check().ok
        again = engine.index(str(data), "pixels")
        assert (again.added, again.updated, again.duplicates) == (0, 0, 0)
        if moves == {"a": "z"}:  # a plain rename: the stored image follows its file (same id)
            assert (report.added, report.updated, report.duplicates) == (0, 1, 0)


NAMES = [f"n{i}.png" for i in range(5)]
#: Four contents of different sizes, so that a rewrite never leaves a file's size unchanged.
CONTENTS = [png_bytes(noise_image(20 + i, size=8 + 2 * i)) for i in range(4)]
_op = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(NAMES), st.integers(0, len(CONTENTS) - 1)),
    st.tuples(st.just("delete"), st.sampled_from(NAMES), st.just(0)),
    st.tuples(st.just("rename"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
)


def _apply(data: Path, op: tuple, clock: list[int]) -> None:
    kind, name, arg = op
    path = data / name
    if kind == "write":
        path.write_bytes(CONTENTS[arg])
        clock[0] += 1
        os.utime(path, (clock[0], clock[0]))  # a distinct mtime per write: the scan compares size and mtime
    elif kind == "delete":
        path.unlink(missing_ok=True)
    elif path.exists() and name != arg:
        path.replace(data / arg)


#: CI runs 40 examples; BULK_EXAMPLES=600 (run once on 2026-11-25, with two more random seeds of 400) goes further.
EXAMPLES = int(os.environ.get("BULK_EXAMPLES", "40"))


@settings(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.tuples(st.lists(_op, min_size=1, max_size=6), st.sampled_from([1, 2, 1000])), min_size=1, max_size=4
    )
)
@pytest.mark.slow
def test_random_changes_between_runs_keep_every_content_stored_once(
    tmp_path_factory: pytest.TempPathFactory, new_database: Callable[[], str | None], steps: list
) -> None:
    root = tmp_path_factory.mktemp("changes")
    data = root / "data"
    data.mkdir()
    clock = [1_000_000]
    for i, name in enumerate(NAMES[:3]):
        _apply(data, ("write", name, i), clock)
    with Engine(root / "home", db=new_database()) as engine:  # a new library per example
        engine.index(str(data), "pixels", workers=0)
        for ops, batch_size in steps:
            for op in ops:
                _apply(data, op, clock)
            if not any(data.iterdir()):
                continue
            report = engine.index(str(data), "pixels", batch_size=batch_size, workers=0)
            assert report.failed == []
            rows = engine.store.images_under(str(data.resolve()))
            on_disk = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir()}
            for row in rows:  # a stored image whose file exists has that file's content
                assert on_disk.get(Path(row.path), row.sha256) == row.sha256
            live = [r.sha256 for r in rows if Path(r.path) in on_disk]
            assert sorted(live) == sorted(set(on_disk.values()))  # every content on disk, once, at a real path
            assert sorted(engine.store.entry_image_ids(engine.model("pixels").id)) == sorted(r.id for r in rows)
            assert engine.check().ok
            again = engine.index(str(data), "pixels", workers=0)
            assert (again.added, again.updated) == (0, 0)


def _vectors(engine: Engine, model: str) -> dict[str, bytes]:
    """path -> stored vector of every image in a model's index."""
    ids = engine.store.entry_image_ids(engine.model(model).id)
    rows = engine.store.images(ids)
    return {rows[i].path: v for i, v in engine.store.entry_vectors(engine.model(model).id, ids)}


def test_several_models_in_one_run_store_what_separate_runs_store(
    tmp_path: Path,
    shapes: Path,
    pillow_decodes: list[tuple[str, tuple[int, int]]],
    new_database: Callable[[], str | None],
) -> None:
    with (
        Engine(tmp_path / "apart", db=new_database()) as apart,
        Engine(tmp_path / "together", db=new_database()) as together,
    ):
        for engine in (apart, together):
            engine.create_model("grey", "pixels", image_size=16, channels=1)  # a second input spec
        apart.index(str(shapes), "pixels")
        apart.index(str(shapes), "grey")
        pillow_decodes.clear()
        reports = together.index_models(str(shapes), ["pixels", "grey", "pixels"])
        files = len(list(shapes.rglob("*.png")))
        assert len(pillow_decodes) == files  # each file decoded once for both specs
        assert [r.model for r in reports] == ["pixels", "grey"] and all(r.added == files for r in reports)
        for model in ("pixels", "grey"):
            assert _vectors(apart, model) == _vectors(together, model)
            assert len(together.vector_index(model)) == files


def test_a_model_added_to_the_set_is_filled_while_the_others_stay_unchanged(tmp_path: Path, shapes: Path) -> None:
    with Engine(tmp_path / "home") as engine:
        engine.index(str(shapes), "pixels")
        engine.create_model("grey", "pixels", image_size=16, channels=1)
        files = len(list(shapes.rglob("*.png")))
        pixels, grey = engine.index_models(str(shapes), ["pixels", "grey"])
        assert (pixels.added, pixels.unchanged, grey.added, grey.unchanged) == (0, files, files, 0)
        again = engine.index_models(str(shapes), ["pixels", "grey"])
        assert all(r.unchanged == files and r.added == 0 for r in again)
        (shapes / "extra.png").write_bytes(png_bytes(noise_image(99)))
        pixels, grey = engine.index_models(str(shapes), ["pixels", "grey"])
        assert pixels.added == grey.added == 1
        assert len(engine.vector_index("pixels")) == len(engine.vector_index("grey")) == files + 1


@pytest.mark.parametrize("where", ["commit", "route"])
def test_a_run_that_fails_part_way_leaves_the_index_in_step_with_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A run that fails part-way ("commit": the third batch's transaction; "route": the run's own
    thread at file 25, after a slow second commit) keeps the batches it committed, in the index as
    in the database (the saved file agrees with it on reopening), and a rerun indexes the rest
    exactly once."""
    from embedsearch.core import bulk
    from embedsearch.core.store import Store
    from embedsearch.errors import StoreError

    data = tmp_path / "data"
    data.mkdir()
    for i in range(50):
        (data / f"{i:02d}.png").write_bytes(png_bytes(noise_image(i, 8)))
    calls = []
    real_write, real_route = Store.write_batch, bulk._route

    def write(self: Store, *args: Any, **kwargs: Any) -> dict[str, int]:
        calls.append("write")
        if where == "commit" and calls.count("write") == 3:
            raise StoreError("the database is gone")
        if where == "route" and calls.count("write") == 2:
            time.sleep(0.3)  # a slow commit just before the failure
        return real_write(self, *args, **kwargs)

    def route(*args: Any) -> None:
        calls.append("route")
        if where == "route" and calls.count("route") == 25:
            raise StoreError("a file went wrong")
        real_route(*args)

    home = tmp_path / "home"
    with Engine(home) as engine:
        monkeypatch.setattr(Store, "write_batch", write)
        monkeypatch.setattr(bulk, "_route", route)
        with pytest.raises(StoreError):
            engine.index(str(data), "pixels", batch_size=10)
        monkeypatch.setattr(Store, "write_batch", real_write)
        monkeypatch.setattr(bulk, "_route", real_route)
        stored = sorted(engine.store.entry_image_ids(engine.model("pixels").id))
        assert len(stored) == 20  # batches 1 and 2
        assert sorted(engine.vector_index("pixels").ids().tolist()) == stored
    with Engine(home) as engine:  # the saved file, reopened: in step with the database
        assert sorted(engine.vector_index("pixels").ids().tolist()) == stored
        report = engine.index(str(data), "pixels", batch_size=10)
        assert (report.added, report.unchanged) == (30, 20)
        assert engine.check().ok
