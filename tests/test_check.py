"""embedsearch check: finds each kind of disagreement, and --repair mends what can be mended."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner
from sqlalchemy import update

from embedsearch.cli.main import main
from embedsearch.core.store import Image, IndexEntry
from embedsearch.core.vectors import VectorIndex
from embedsearch.engine import Engine


def check(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--home", str(home), "check", *args])
    return result.exit_code, result.stdout


def test_a_clean_library_is_consistent(library_home: Path) -> None:
    code, out = check(library_home)
    assert code == 0 and out.strip().endswith("consistent")
    with Engine(library_home) as engine:
        report = engine.check()
    assert report.ok and report.models["pca"].entries == report.models["pca"].vectors_in_file == 49


def test_an_index_file_behind_the_database_is_a_note_and_repair_rewrites_it(library_home: Path) -> None:
    (library_home / "indexes" / "pca.faiss").unlink()  # a crash before the first save looks like this
    code, out = check(library_home)
    assert code == 0 and "index file is behind the database" in out
    code, out = check(library_home, "--repair")
    assert code == 0 and "rebuilt its index file" in out
    assert "behind" not in check(library_home)[1]


def test_orphans_catch_up_but_a_stale_vector_is_a_problem(library_home: Path) -> None:
    with Engine(library_home) as engine:
        model = engine.model("pca")
        index = VectorIndex.load(engine.index_path("pca"), model.dim, model.metric)
        index.add(np.array([9999]), np.ones((1, model.dim), np.float32))  # an image deleted after the save
        index.save(engine.index_path("pca"))
        report = engine.check()
        assert report.ok and report.notes
        first = int(index.ids()[0])
        index.remove([first])
        index.add(np.array([first]), np.full((1, model.dim), 7.0, np.float32))  # a vector the database never had
        index.save(engine.index_path("pca"))
        report = engine.check()
        assert not report.ok and report.models["pca"].stale_in_file == 1
        assert engine.check(repair=True).ok


def test_damaged_stored_vector_is_reencoded(library_home: Path) -> None:
    with Engine(library_home) as engine:
        model = engine.model("pca")
        image_id = engine.store.entry_image_ids(model.id)[0]
        original = dict(engine.store.entry_vectors(model.id, [image_id]))[image_id]
        with engine.store.session() as s:
            s.execute(
                update(IndexEntry)
                .where(IndexEntry.model_id == model.id, IndexEntry.image_id == image_id)
                .values(vector=b"\0\0")
            )
        report = engine.check()
        assert report.models["pca"].bad_vectors == 1 and not report.ok
        repaired = engine.check(repair=True)
        assert repaired.ok and any("re-encoded 1" in line for line in repaired.repaired)
        again = dict(engine.store.entry_vectors(model.id, [image_id]))[image_id]
        assert np.allclose(np.frombuffer(again, np.float32), np.frombuffer(original, np.float32), atol=1e-5)


def test_tampered_checkpoint_cannot_be_repaired(library_home: Path) -> None:
    weights = library_home / "models" / "pca" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\1")
    code, out = check(library_home, "--repair")
    assert code == 1 and "does not match its recorded sha256" in out


def test_stored_uploads_are_verified_and_strays_removed(library_home: Path) -> None:
    [upload] = list((library_home / "uploads").rglob("*.png"))
    stray = upload.parent / "0123.png"
    stray.write_bytes(b"stray")
    upload.write_bytes(upload.read_bytes() + b"tampered")
    with Engine(library_home) as engine:
        report = engine.check(repair=True)
    assert not stray.exists()
    assert not report.ok and any("does not match its sha256" in p for p in report.problems)


def test_image_rows_in_no_index_are_dropped(library_home: Path, shapes: Path) -> None:
    with Engine(library_home) as engine:
        with engine.store.session() as s:
            s.add(Image(path="/nowhere.png", sha256="f" * 64, width=1, height=1, format="PNG", mode="L", bytes=1))
        assert not engine.check().ok
        assert engine.check(repair=True).ok
        assert engine.store.image_by_path("/nowhere.png") is None
