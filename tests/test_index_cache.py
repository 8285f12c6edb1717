"""One owner of index state: after every command, each index file on disk matches the database.

Each write path (bulk index, upload, delete, remove, generate --add, remove --generated, train
--replace, check --repair) is run the way a user runs it, and then the files are checked from a
fresh process's point of view: ``check`` has no 'behind' note, and loading each index has nothing
to catch up on (no 'brought in step' log line).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from embedsearch.cli.main import main
from embedsearch.core.vectors import VectorIndex
from embedsearch.data.synth import make_shapes
from embedsearch.engine import Engine
from embedsearch.http.app import create_app

TINY_VAE = ["--epochs", "1", "--latent-dim", "4", "--batch-size", "16"]


def png(seed: int) -> bytes:
    import io

    arr = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def run(home: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["--home", str(home), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def assert_files_in_step(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every model's index file holds exactly the database's entries, as a new process sees it."""
    with Engine(home) as engine:
        models = engine.store.models()
        assert models
        for model in models:
            on_disk = VectorIndex.load(engine.index_path(model.name), model.dim, model.metric)
            assert on_disk.in_step(engine.store, model.id), f"{model.name}: file behind the database"
            assert sorted(on_disk.ids().tolist()) == sorted(engine.store.entry_image_ids(model.id))
        report = engine.check()
        assert report.ok, report.problems
        assert not [n for n in report.notes if "behind" in n], report.notes
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="embedsearch"), Engine(home) as engine:
        for model in models:
            engine.vector_index(model.name)
    assert "brought in step" not in caplog.text


def cli_library(tmp_path: Path) -> tuple[Path, Path]:
    """A library made with the CLI: shapes indexed with pixels and with a tiny VAE."""
    data = tmp_path / "data"
    make_shapes(data, per_class=4, size=28, seed=3, mode="L")
    home = tmp_path / "home"
    run(home, "index", str(data), "--model", "pixels")
    run(home, "train", str(data), "--model", "vae", "--name", "vae", *TINY_VAE)
    run(home, "index", str(data), "--model", "vae")
    return home, data


@pytest.mark.slow
def test_every_write_command_leaves_the_index_files_in_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    home, data = cli_library(tmp_path)
    assert_files_in_step(home, caplog)  # bulk index (both models)

    with Engine(home) as engine:  # upload through the API: into every model
        added = engine.add_image(png(1), label="upload")
    assert_files_in_step(home, caplog)

    with Engine(home) as engine:
        engine.delete_image(added.id)
    assert_files_in_step(home, caplog)

    # the service defers saves; it writes them when it stops
    with TestClient(create_app(home), base_url="http://localhost") as client:
        response = client.post("/api/images", files=[("files", ("a.png", png(2), "image/png"))])
        assert response.status_code == 200, response.text
    assert_files_in_step(home, caplog)

    run(home, "train", str(data), "--model", "pca", "--name", "pixels2", "--dim", "4")
    run(home, "index", str(data), "--model", "pixels2")
    run(home, "train", str(data), "--model", "pca", "--name", "pixels2", "--dim", "3", "--replace")
    assert_files_in_step(home, caplog)

    run(home, "remove", str(data / "circle"))
    assert_files_in_step(home, caplog)

    run(home, "generate", "--model", "vae", "-n", "4", "--add")
    assert_files_in_step(home, caplog)

    assert any((home / "generated").rglob("*.png"))
    run(home, "remove", "--generated")
    assert_files_in_step(home, caplog)
    assert not any((home / "generated").iterdir()), "empty folders left under generated/"

    (home / "indexes" / "vae.faiss").unlink()  # a lost cache file: check --repair rebuilds it
    run(home, "check", "--repair")
    assert_files_in_step(home, caplog)


def test_remove_of_stored_files_deletes_them_and_their_empty_folders(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_shapes(data, per_class=2, size=28, seed=4, mode="L")
    home = tmp_path / "home"
    run(home, "index", str(data), "--model", "pixels")
    with Engine(home) as engine:
        added = engine.add_image(png(5))
        stored = Path(engine.image(added.id).path or "")
    assert stored.is_file() and stored.is_relative_to(home / "uploads")
    run(home, "remove", str(stored))
    assert not stored.exists()
    assert not stored.parent.exists(), "the empty content-hash folder stays behind"
    with Engine(home) as engine:
        report = engine.check()
    assert report.ok, report.problems  # no 'stored file without an image row'
    user_file = next(data.rglob("*.png"))
    run(home, "remove", str(user_file))
    assert user_file.exists(), "a user's own file must never be deleted"


@pytest.mark.slow
def test_a_delete_racing_an_upload_of_the_same_content_never_loses_its_file(tmp_path: Path) -> None:
    """The stored file is deleted under the writer lock: an upload acknowledged after the delete
    (same bytes, same stored path) always finds its file on disk."""
    data = tmp_path / "data"
    make_shapes(data, per_class=1, size=28, seed=5, mode="L")
    with Engine(tmp_path / "home") as engine:
        engine.index(str(data), "pixels")
        content = png(6)
        for _ in range(40):
            first = engine.add_image(content)
            deleter = threading.Thread(target=engine.delete_image, args=(first.id,))
            uploader = threading.Thread(target=engine.add_image, args=(content,))
            deleter.start()
            uploader.start()
            deleter.join()
            uploader.join()
            rows = engine.store.all_shas_for([first.sha256])
            if rows:  # the upload won: it is acknowledged and stored
                record = engine.image(rows[first.sha256])
                assert record.path and Path(record.path).is_file(), "an acknowledged upload lost its file"
                engine.delete_image(record.id)
