"""embedsearch check: finds each kind of disagreement, and --repair mends what can be mended."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import update

from embedsearch.cli.main import main
from embedsearch.core.store import Image, IndexEntry
from embedsearch.core.vectors import VectorIndex
from embedsearch.engine import Engine
from helpers import noise_image, png_bytes, weights_file


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


def test_an_index_rebuilt_over_a_damaged_vector_leaves_it_out_and_check_repairs_it(
    library_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored vector of the wrong size used to stop the rebuild of the FAISS file (a ValueError from
    every open); now the index holds the others, the log says what to run, and check --repair mends it."""
    with Engine(library_home) as engine:
        model = engine.model("pca")
        ids = engine.store.entry_image_ids(model.id)
        with engine.store.session() as s:
            s.execute(
                update(IndexEntry)
                .where(IndexEntry.model_id == model.id, IndexEntry.image_id == ids[0])
                .values(vector=b"\0\0")
            )
        path = engine.index_path("pca")
    path.unlink()  # the cache file is gone: the next open rebuilds it from the database
    with Engine(library_home) as engine, caplog.at_level("WARNING"):
        assert sorted(engine.vector_index("pca").ids().tolist()) == sorted(ids[1:])
        assert "wrong size" in caplog.text and "check --repair" in caplog.text
        assert engine.check(repair=True).ok
        assert sorted(engine.vector_index("pca").ids().tolist()) == sorted(ids)


def test_tampered_checkpoint_cannot_be_repaired(library_home: Path) -> None:
    weights = weights_file(library_home, "pca")
    weights.write_bytes(weights.read_bytes()[:-1] + b"\1")
    code, out = check(library_home, "--repair")
    assert code == 1 and "does not match its recorded sha256" in out


def test_stored_uploads_are_verified_and_strays_kept_in_lost_and_found(library_home: Path) -> None:
    [upload] = list((library_home / "uploads").rglob("*.png"))
    stray = upload.parent / "0123.png"
    stray.write_bytes(b"stray")
    upload.write_bytes(upload.read_bytes() + b"tampered")
    with Engine(library_home) as engine:
        report = engine.check(repair=True)
    kept = library_home / "lost+found" / stray.relative_to(library_home)
    assert not stray.exists() and kept.read_bytes() == b"stray"
    assert any("lost+found" in line for line in report.repaired)
    assert upload.exists()  # a tampered upload is reported, never deleted
    assert not report.ok and any("does not match its sha256" in p for p in report.problems)


def test_an_image_row_whose_file_is_gone_is_kept_and_reported(library_home: Path) -> None:
    with Engine(library_home) as engine:
        with engine.store.session() as s:
            s.add(Image(path="/nowhere.png", sha256="f" * 64, width=1, height=1, format="PNG", mode="L", bytes=1))
        assert not engine.check().ok
        report = engine.check(repair=True)
        assert engine.store.image_by_path("/nowhere.png") is not None
        assert any("could not be read" in note for note in report.notes)


def _library_counts(home: Path) -> tuple[int, int]:
    with Engine(home) as engine:
        rows = len(engine.store.image_paths())
    return rows, len([f for f in (home / "uploads").rglob("*") if f.is_file()])


def test_train_replace_keeps_the_library_consistent_and_repair_loses_nothing(
    home: Path, shapes: Path, tmp_path: Path
) -> None:
    # The repro: a library with only a PCA model, its images, and uploads.
    with Engine(home) as engine:
        engine.create_model("pca", "pca", str(shapes), options={"dim": 8})
        engine.index(str(shapes), "pca")
        for seed in range(3):
            engine.add_image(png_bytes(noise_image(seed, 24)), label="upload")
    before = _library_counts(home)
    result = CliRunner().invoke(main, ["--home", str(home), "train", str(shapes), "--model", "pca", "--replace"])
    assert result.exit_code == 0, result.output
    code, out = check(home)
    assert code == 0, out  # the new model indexes what the old one held: nothing is in no index
    with Engine(home) as engine:
        assert engine.info().images == before[0]
        model = engine.model("pca")
        assert len(engine.store.entry_image_ids(model.id)) == before[0]
        # The old failure mode, made by hand: every image in no index. Repair re-encodes them.
        engine.store.delete_entries(model.id, engine.store.entry_image_ids(model.id))
    code, out = check(home, "--repair", "--dry-run")
    assert code == 1 and "would repair: model 'pca': encoded" in out
    assert check(home)[0] == 1  # the dry run changed nothing
    code, out = check(home, "--repair")
    assert code == 0 and "repaired: model 'pca': encoded" in out, out
    assert check(home, "--repair")[0] == 0
    assert _library_counts(home) == before


def test_repair_against_the_wrong_database_refuses(library_home: Path, tmp_path: Path) -> None:
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with Engine(library_home, db=other) as engine:
        engine.open(create=True)  # an empty library database: a mistyped --db that exists
    for _ in range(2):
        (library_home / "uploads" / "ab").mkdir(exist_ok=True)
    extra = library_home / "uploads" / "ab" / ("ab" + "0" * 62 + ".png")
    extra.write_bytes(png_bytes(noise_image(5, 20)))  # two stored files, so "far fewer" is clear
    files = sorted((library_home / "uploads").rglob("*.png"))
    result = CliRunner().invoke(main, ["--home", str(library_home), "--db", other, "check", "--repair"])
    assert result.exit_code == 1 and "wrong --db?" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted((library_home / "uploads").rglob("*.png")) == files


def test_an_index_file_of_another_model_is_corrupt_and_rebuilt(library_home: Path, shapes: Path) -> None:
    with Engine(library_home) as engine:
        engine.create_model("pca2", "pca", str(shapes), options={"dim": 8})
        engine.index(str(shapes), "pca2")
        probe = str(next(shapes.rglob("*.png")))
        want = [n.id for n in engine.search_image(engine.store.image_by_path(probe).id, "pca", k=5)]
    a, b = library_home / "indexes" / "pca.faiss", library_home / "indexes" / "pca2.faiss"
    for suffix in ("", ".json"):  # swap both models' files (same dimension)
        x, y = Path(f"{a}{suffix}"), Path(f"{b}{suffix}")
        tmp = x.with_name("swap")
        x.rename(tmp), y.rename(x), tmp.rename(y)
    code, out = check(library_home)
    assert code == 1 and "is corrupt (belongs to model 'pca2'" in out and "behind" not in out
    with Engine(library_home) as engine:  # opening rebuilds it from the database
        assert [n.id for n in engine.search_image(engine.store.image_by_path(probe).id, "pca", k=5)] == want
        engine.search_image(engine.store.image_by_path(probe).id, "pca2", k=5)
    assert check(library_home)[0] == 0


def test_a_folder_in_the_index_files_place_is_reported_and_mended(library_home: Path) -> None:
    path = library_home / "indexes" / "pca.faiss"
    path.unlink()
    path.mkdir()
    (path / "note.txt").write_text("someone's file")
    code, out = check(library_home)
    assert code == 1 and "pca.faiss is corrupt (a folder, not an index file)" in out
    code, out = check(library_home, "--repair")
    assert code == 0, out
    assert (library_home / "lost+found" / "indexes" / "pca.faiss" / "note.txt").read_text() == "someone's file"
    assert path.is_file()
