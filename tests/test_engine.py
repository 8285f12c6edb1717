from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from embedsearch.engine import Engine
from embedsearch.errors import DataError, InvalidArgumentError, ModelError, UnknownModelError
from embedsearch.results import QueryResult
from helpers import noise_image, png_bytes, weights_file

#: Every test here runs on both metadata stores (conftest.py: ``database``).


def results(engine: Engine, paths: list[str], model: str, k: int = 5) -> list[QueryResult]:
    return [r for r in engine.query(paths, model, k) if isinstance(r, QueryResult)]


def test_index_then_query_returns_the_image_itself_first(engine: Engine, shapes: Path) -> None:
    report = engine.index(str(shapes), "pixels")
    assert (report.added, report.failed, report.duplicates) == (48, [], 0)
    query = sorted((shapes / "star").iterdir())[2]
    [result] = results(engine, [str(query)], "pixels")
    top = result.results[0]
    assert top.path == str(query) and top.distance == 0.0 and top.label == "star"
    assert [n.rank for n in result.results] == [1, 2, 3, 4, 5]


def test_pixels_model_is_created_from_the_data(indexed: Engine) -> None:
    [info] = indexed.models()
    assert (info.kind, info.image_size, info.channels, info.dim, info.vectors) == ("pixels", 32, 3, 3072, 48)


def test_second_run_adds_nothing_and_changed_files_are_reencoded(indexed: Engine, shapes: Path) -> None:
    engine = indexed
    again = engine.index(str(shapes), "pixels")
    assert (again.added, again.updated, again.unchanged) == (0, 0, 48)
    target = sorted((shapes / "circle").iterdir())[0]
    target.write_bytes(png_bytes(noise_image(7, 32)))
    os.utime(target, (1e9, 1e9))
    third = engine.index(str(shapes), "pixels")
    assert (third.added, third.updated, third.unchanged) == (0, 1, 47)
    [result] = results(engine, [str(target)], "pixels", k=1)
    assert result.results[0].path == str(target) and result.results[0].distance == 0.0
    assert engine.info().models[0].vectors == 48


def test_identical_files_are_stored_once(engine: Engine, shapes: Path) -> None:
    src = sorted((shapes / "ring").iterdir())[0]
    shutil.copy(src, shapes / "ring" / "copy.png")
    shutil.copy(src, shapes / "copy-at-top.png")
    report = engine.index(str(shapes), "pixels")
    assert (report.added, report.duplicates) == (48, 2)
    assert engine.info().images == 48


def test_bad_files_are_listed_and_never_stop_the_run(engine: Engine, shapes: Path) -> None:
    (shapes / "empty.png").write_bytes(b"")
    (shapes / "text.png").write_text("not an image")
    good = png_bytes(noise_image(3, 32))
    (shapes / "cut.png").write_bytes(good[: len(good) // 2])
    report = engine.index(str(shapes), "pixels")
    reasons = {Path(p).name: r for p, r in report.failed}
    assert set(reasons) == {"empty.png", "text.png", "cut.png"}
    assert reasons["empty.png"] == "empty file"
    assert report.added == 48


def test_remove_a_file_and_a_folder(indexed: Engine, shapes: Path) -> None:
    engine = indexed
    one = sorted((shapes / "arrow").iterdir())[0]
    assert engine.remove([str(one)]) == 1
    assert engine.remove([str(shapes / "cross")]) == 6
    assert engine.info().models[0].vectors == 41
    hits = results(engine, [str(one)], "pixels", k=50)[0].results
    assert all(h.path != str(one) and h.label != "cross" for h in hits) and len(hits) == 41
    with pytest.raises(DataError, match="no indexed image"):
        engine.remove([str(one)])


def test_pca_train_index_query_and_round_trip(home: Path, shapes: Path) -> None:
    with Engine(home) as engine:
        info = engine.create_model("pca8", "pca", str(shapes), options={"dim": 8})
        assert (info.dim, info.kind) == (8, "pca")
        engine.index(str(shapes), "pca8")
        probe = sorted((shapes / "square").iterdir())[1]
        before, _, _ = engine.encode_files([str(probe)], "pca8")
        first = results(engine, [str(probe)], "pca8", k=1)[0].results[0]
        assert first.path == str(probe) and first.distance == pytest.approx(0.0, abs=1e-5)
    with Engine(home) as reopened:  # weights and index files load back to identical vectors
        after, _, _ = reopened.encode_files([str(probe)], "pca8")
        assert np.array_equal(before, after)
        assert reopened.models()[0].vectors == 48


def test_tampered_checkpoint_is_refused(home: Path, shapes: Path) -> None:
    with Engine(home) as engine:
        engine.create_model("pca", "pca", str(shapes), options={"dim": 4})
        weights = weights_file(home, "pca")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with Engine(home) as engine, pytest.raises(ModelError, match="does not match"):
        engine.encoder("pca")
    weights.unlink()
    with Engine(home) as engine, pytest.raises(ModelError, match="missing"):
        engine.encoder("pca")


def test_user_errors_are_package_errors(engine: Engine, shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="unknown model 'nope'"):
        engine.index(str(shapes), "nope")
    engine.index(str(shapes), "pixels")
    with pytest.raises(DataError, match="no such file"):
        list(engine.query([str(tmp_path / "missing.png")], "pixels"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        list(engine.query([str(tmp_path / "empty")], "pixels"))
    with pytest.raises(InvalidArgumentError, match="exists already"):
        engine.create_model("pixels", "pixels", str(shapes))
    with pytest.raises(InvalidArgumentError, match="metric"):
        engine.index(str(shapes), "pixels", metric="cosine")


def test_cosine_model_and_folder_query(engine: Engine, shapes: Path) -> None:
    engine.create_model("cos", "pca", str(shapes), metric="cosine", options={"dim": 6})
    engine.index(str(shapes), "cos")
    out = results(engine, [str(shapes / "circle")], "cos", k=3)
    assert len(out) == 6
    for r in out:
        assert r.results[0].path == r.query and 0 <= r.results[0].distance < 1e-5


def test_index_file_is_rebuilt_when_deleted(home: Path, shapes: Path) -> None:
    with Engine(home) as engine:
        engine.index(str(shapes), "pixels")
    (home / "indexes" / "pixels.faiss").unlink()
    with Engine(home) as engine:  # searches see every image again, and the library is consistent
        probe = sorted((shapes / "ring").iterdir())[0]
        [result] = results(engine, [str(probe)], "pixels", k=50)
        assert len(result.results) == 48 and len({n.id for n in result.results}) == 48
        assert result.results[0].path == str(probe) and result.results[0].distance == 0.0
        assert engine.check().ok


def test_reads_of_a_missing_library_raise_and_create_nothing(tmp_path: Path, database: str | None) -> None:
    """Issue 12.2, the Python API: opening and reading create no folder and no database (tables)."""
    from embedsearch.errors import NoLibraryError

    home = tmp_path / "home"
    where = re.escape(str(home / "library.db")) if database is None else "postgresql\\+psycopg://"
    probe = tmp_path / "probe.png"
    probe.write_bytes(png_bytes(noise_image(1)))
    with Engine(home) as engine:
        for read in (engine.info, engine.models, engine.stats, lambda: engine.image(1), engine.check):
            with pytest.raises(NoLibraryError, match=f"no library at {where}"):
                read()
        with pytest.raises(NoLibraryError):
            list(engine.query([str(probe)], "pixels"))
        with pytest.raises(NoLibraryError):  # a write that needs a library does not start one either
            engine.add_image(png_bytes(noise_image(1)))
    with Engine(home, db=f"sqlite:///{tmp_path}/nowhere/x.db") as engine, pytest.raises(NoLibraryError):
        engine.check(repair=True)
    assert list(tmp_path.iterdir()) == [probe]


def test_the_first_write_creates_the_library(
    tmp_path: Path, shapes: Path, database: str | None, new_database: Callable[[], str | None]
) -> None:
    home = tmp_path / "home"
    with Engine(home) as engine:
        assert not home.exists()
        assert engine.index(str(shapes), "pixels").added == 48
        assert engine.info().images == 48 and (home / "library.db").is_file() == (database is None)
    with Engine(tmp_path / "other", db=new_database(), create=True) as engine:
        assert engine.models() == [] and engine.info().images == 0


@pytest.mark.parametrize("index_file", ["in step", "missing"])
def test_a_read_only_library_reads_and_refuses_writes_in_one_line(
    library_home: Path, shapes: Path, index_file: str
) -> None:
    """Issue 12.6: another user's library, or one on a read-only disk (here a read-only bind mount,
    which holds for root too): reading works, writing raises ReadOnlyError, nothing is changed."""
    from embedsearch.errors import ReadOnlyError
    from helpers import read_only_mount

    if index_file == "missing":  # the owner's service defers saves: the file is behind; readers catch up in memory
        (library_home / "indexes" / "pixels.faiss").unlink()
    before = {p: p.stat().st_mtime_ns for p in library_home.rglob("*")}
    probe = str(sorted((shapes / "star").iterdir())[0])
    with read_only_mount(library_home), Engine(library_home) as engine:
        assert engine.info().images == 49 and engine.read_only
        assert [m.name for m in engine.models()] == ["pca", "pixels"]
        [result] = results(engine, [probe], "pixels", k=1)
        assert result.results[0].path == probe
        assert engine.check().ok
        writes = [
            lambda: engine.index(str(shapes), "pixels"),
            lambda: engine.remove([probe]),
            lambda: engine.add_image(png_bytes(noise_image(5, 30))),
            lambda: engine.create_model("p2", "pca", str(shapes), options={"dim": 4}),
            lambda: engine.delete_model("pca"),
            lambda: engine.check(repair=True),
        ]
        for write in writes:
            with pytest.raises(ReadOnlyError, match="read-only for this user; reading it works"):
                write()
    assert {p: p.stat().st_mtime_ns for p in library_home.rglob("*")} == before


def test_file_names_that_are_not_utf8_are_indexed_and_removed(engine: Engine, shapes: Path) -> None:
    """Issue 12.6: '\\xff\\xfe.png' aborted the whole run (UnicodeEncodeError, nothing committed) and
    'remove' of it failed. Now it is stored losslessly (the database holds valid UTF-8; see
    schema.encode_name) and comes back as the very name the file system gave."""
    raw = os.fsencode(shapes) + b"/\xff\xfe.png"
    folder = os.fsencode(shapes) + b"/caf\xe9"  # a Latin-1 folder name: the label of what is under it
    os.mkdir(folder)
    with open(raw, "wb") as fh:
        fh.write(png_bytes(noise_image(11, 32)))
    with open(folder + b"/x.png", "wb") as fh:
        fh.write(png_bytes(noise_image(12, 32)))
    report = engine.index(str(shapes), "pixels")
    assert (report.added, report.failed) == (50, [])
    name = os.fsdecode(raw)
    [result] = results(engine, [name], "pixels", k=1)
    assert result.results[0].path == name and os.fsencode(result.results[0].path) == raw
    [under] = results(engine, [os.fsdecode(folder + b"/x.png")], "pixels", k=1)
    assert under.results[0].label == os.fsdecode(b"caf\xe9")
    assert engine.index(str(shapes), "pixels").unchanged == 50  # the stored names match the scan's
    assert engine.remove([name]) == 1 and engine.remove([os.fsdecode(folder)]) == 1
    assert engine.info().images == 48


def test_stored_names_round_trip_and_keep_prefixes() -> None:
    from embedsearch.core.schema import decode_name, encode_name

    names = ["/a/b.png", "/a/\udcff\udcfe.png", "/x/\ufdd0y", "/x/\ufdd0\udc80\ufdd0", "é/漢\n"]
    for name in names:
        stored = encode_name(name)
        stored.encode("utf-8")  # valid UTF-8, whatever the name
        assert decode_name(stored) == name
    assert encode_name("/a/b.png") == "/a/b.png"  # valid names are stored as they are
    assert encode_name("/a/\udcff/b.png").startswith(encode_name("/a/\udcff/"))
