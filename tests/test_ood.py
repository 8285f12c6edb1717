"""Out-of-distribution warnings (issue 16.4): each AE/VAE query's novelty as a percentile of the indexed images'.

The fast tests use the module's ``trained`` library (its models are too weak to tell noise from shapes,
but every stored and computed value can be checked); the slow ones train an AE and a VAE that can,
and check the in-distribution and out-of-distribution queries through the Engine, the CLI and the API.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect, text

from embedsearch.cli.main import main
from embedsearch.core import novelty
from embedsearch.core.database import alembic_config
from embedsearch.core.novelty import split_novelty, with_novelty
from embedsearch.core.ray_bulk import EncodeFiles
from embedsearch.core.store import Store
from embedsearch.data.images import decode_file, scan
from embedsearch.engine import Engine
from embedsearch.http.app import create_app
from embedsearch.results import OOD_WARNING, QueryResult, ood_warning
from helpers import noise_image, png_bytes


def noise_png(seed: int = 3, size: int = 28) -> bytes:
    return png_bytes(noise_image(seed, size, "L"))


def pixels_of(engine: Engine, model: str, paths: list[Path]) -> np.ndarray:
    spec = engine.encoder(model).spec
    return np.stack([decode_file(str(p), spec)[1] for p in paths])  # (N, S, S, C) uint8


# -- what is measured and stored -------------------------------------------------------------------


def test_a_library_is_scored_whole_up_to_the_sample_then_in_proportion() -> None:
    assert novelty.sample_rate(0, novelty.SAMPLE) == 1.0
    assert novelty.sample_rate(0, 4 * novelty.SAMPLE) == 0.25  # a first large run: SAMPLE of it
    assert novelty.sample_rate(novelty.SAMPLE // 2, novelty.SAMPLE // 2) == 1.0
    big = novelty.sample_rate(10 * novelty.SAMPLE, 10 * novelty.SAMPLE)  # its share of the grown library
    assert big == pytest.approx(1 / 20)
    rng = np.random.default_rng(0)
    shas = [rng.bytes(32).hex() for _ in range(4000)]
    picked = [novelty.chosen(sha, 0.25) for sha in shas]
    assert picked == [novelty.chosen(sha, 0.25) for sha in shas]  # the same content, the same answer
    assert 0.22 < sum(picked) / len(shas) < 0.28
    assert all(novelty.chosen(sha, 1.0) for sha in shas)


def test_a_run_beyond_the_sample_scores_the_chosen_images_only(
    engine: Engine, trained_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the sampled images go through the decoder; their values are the full computation's, the
    others store none, and a query by id of one of those has no percentile (its neighbours are the same)."""
    monkeypatch.setattr(novelty, "SAMPLE", 10)
    engine.create_model("ae", "ae", str(trained_data), options={"epochs": 1, "latent_dim": 8, "batch_size": 16})
    report = engine.index(str(trained_data), "ae", workers=0)
    paths = sorted(trained_data.rglob("*.png"))
    assert report.added == len(paths) > 20
    rows = {str(p): engine.store.image_by_path(str(p)) for p in paths}
    rate = novelty.sample_rate(0, len(paths))
    stored = engine.store.entry_novelty(engine.model("ae").id, [r.id for r in rows.values()])
    sampled = [p for p, r in rows.items() if novelty.chosen(r.sha256, rate)]
    assert 0 < len(sampled) < len(paths)
    assert {p for p, r in rows.items() if stored[r.id] is not None} == set(sampled)
    want = engine.encoder("ae").novelty(pixels_of(engine, "ae", [Path(p) for p in sampled]))
    np.testing.assert_allclose([stored[rows[p].id] for p in sampled], want, rtol=1e-5)
    outside = next(r.id for p, r in rows.items() if p not in sampled)
    inside = rows[sampled[0]].id
    assert engine.query_image(outside, "ae", k=3).ood_percentile is None
    assert engine.query_image(inside, "ae", k=3).ood_percentile is not None


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_novelty_is_deterministic_and_stored_when_indexed(trained: Engine, trained_data: Path, kind: str) -> None:
    paths = sorted(trained_data.rglob("*.png"))[:5]
    encoder = trained.encoder(kind)
    images = pixels_of(trained, kind, paths)
    codes, scores = encoder.encode_scored(images)
    assert scores is not None and scores.shape == (5,) and scores.dtype == np.float64
    np.testing.assert_allclose(codes, encoder.encode(images), rtol=1e-5, atol=1e-6)  # the same codes
    np.testing.assert_allclose(encoder.novelty(images), scores, rtol=1e-6)  # no sampling: the same values
    assert (scores > 0).all()  # nats per image: a loss
    ids = [trained.store.image_by_path(str(p)).id for p in paths]
    stored = trained.store.entry_novelty(trained.model(kind).id, ids)
    np.testing.assert_allclose([stored[i] for i in ids], scores, rtol=1e-5)


def test_kinds_without_a_decoder_have_no_novelty(trained: Engine, trained_data: Path) -> None:
    probe = sorted(trained_data.rglob("*.png"))[0]
    assert trained.encoder("pixels").encode_scored(pixels_of(trained, "pixels", [probe]))[1] is None
    assert trained.store.novelties(trained.model("pixels").id) == []
    found = trained.query_bytes(probe.read_bytes(), "pixels", k=3)
    assert found.ood_percentile is None and found.warning is None and len(found.results) == 3
    assert trained.query_image(found.results[0].id, "pixels").ood_percentile is None


def test_a_query_by_id_ranks_the_images_stored_novelty(trained: Engine, trained_data: Path) -> None:
    model = trained.model("vae")
    population = np.sort(trained.store.novelties(model.id))
    probe = sorted(trained_data.rglob("*.png"))[7]
    image_id = trained.store.image_by_path(str(probe)).id
    own = trained.store.entry_novelty(model.id, [image_id])[image_id]
    want = 100 * np.searchsorted(population, own, side="right") / len(population)
    found = trained.query_image(image_id, "vae", k=2)
    assert found.ood_percentile == pytest.approx(want, abs=0.01)
    assert found.query == f"id:{image_id}" and found.results[0].id == image_id
    # A file query of the same image computes the same value again (up to float noise).
    by_file = trained.query_bytes(probe.read_bytes(), "vae", k=2)
    assert by_file.ood_percentile == pytest.approx(want, abs=100 / len(population))


def test_the_percentiles_follow_the_models_vectors(trained: Engine) -> None:
    """Cached per model, reloaded when its index changes: an upload joins the population at once."""
    model = trained.model("ae")
    before = len(trained.store.novelties(model.id))
    trained.query_bytes(noise_png(40), "ae", k=1)  # loads the cache
    cached = trained.search.novelty._scores(model)
    assert len(cached) == before
    trained.add_image(noise_png(41), label="upload")
    assert len(trained.search.novelty._scores(trained.model("ae"))) == before + 1
    assert trained.search.novelty._scores(trained.model("ae")) is trained.search.novelty._scores(trained.model("ae"))


def test_workers_ship_each_novelty_beside_its_code(trained: Engine, trained_data: Path) -> None:
    """A Ray worker's codes carry the novelty as a last column, which the driver splits off again."""
    encoder = trained.encoder("ae")
    files = list(scan(str(trained_data)))[:4]
    items = EncodeFiles([(encoder, 0), (trained.encoder("pixels"), 0)], [encoder.spec], 10**8).encode(files)
    shipped = np.stack([item.codes[0] for item in items])
    assert shipped.shape == (4, encoder.code_width + 1)
    codes, scores = split_novelty(encoder, shipped)
    want_codes, want_scores = encoder.encode_scored(pixels_of(trained, "ae", [Path(f.path) for f in files]))
    np.testing.assert_allclose(codes, want_codes, rtol=1e-5, atol=1e-6)
    assert scores is not None
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    plain = np.stack([item.codes[1] for item in items])  # pixels: no novelty, nothing added
    assert split_novelty(trained.encoder("pixels"), plain)[1] is None
    assert with_novelty(plain, None) is plain


def test_the_api_has_the_fields_on_every_store(trained: Engine, trained_data: Path) -> None:
    """SearchOut's ood_percentile and warning, by upload and by id (whose stored value is ranked)."""
    probe = sorted(trained_data.rglob("*.png"))[3]
    image_id = trained.store.image_by_path(str(probe)).id
    with TestClient(create_app(trained), base_url="http://localhost") as client:
        for model in ("vae", "pixels"):
            sent = {"file": ("q.png", probe.read_bytes())}
            by_upload = client.post("/api/search", files=sent, data={"model": model, "k": "2"}).json()
            by_id = client.get("/api/search", params={"image_id": image_id, "model": model, "k": 2}).json()
            for body in (by_upload, by_id):
                assert set(body) == {"model", "results", "ood_percentile", "warning"}, body
            if model == "pixels":
                assert by_upload["ood_percentile"] is None and by_id["ood_percentile"] is None
            else:
                want = trained.query_image(image_id, model).ood_percentile
                assert by_id["ood_percentile"] == want and 0 < want <= 100
                assert by_upload["ood_percentile"] == pytest.approx(want, abs=5)
                assert by_id["warning"] == ood_warning(want)


def test_the_warning_is_set_above_the_99th_percentile_only() -> None:
    assert ood_warning(None) is None and ood_warning(99.0) is None and ood_warning(42.0) is None
    assert (
        ood_warning(99.5)
        == OOD_WARNING
        == "this image is unlike what the model was trained on: results may be meaningless"
    )
    assert QueryResult("q", "m", [], 100.0).warning == OOD_WARNING


# -- libraries from before the column ----------------------------------------------------------------


@pytest.fixture
def url(tmp_path: Path, database: str | None) -> str:
    return database or f"sqlite:///{tmp_path / 'lib.db'}"


def test_upgrading_a_library_from_before_novelty_keeps_its_entries_unscored(url: str) -> None:
    """Migration 0005: existing entries get a null novelty, new ones a value; the population is the
    scored entries; downgrade drops the column again."""
    from alembic import command

    from embedsearch.core.database import make_engine

    old = create_engine(url)
    with old.begin() as conn:
        command.upgrade(alembic_config(conn), "0004")
        conn.execute(
            text(
                "INSERT INTO models (name, kind, config, dim, metric, image_size, channels, fit, created_at) "
                "VALUES ('ae', 'ae', '{}', 2, 'l2', 2, 1, 'pad', '2026-12-01 00:00:00')"
            )
        )
        for n in (1, 2):
            conn.execute(
                text(
                    "INSERT INTO images (path, sha256, width, height, format, mode, bytes, generated, added_at) "
                    "VALUES (:path, :sha, 2, 2, 'PNG', 'L', 10, false, '2026-12-01 00:00:00')"
                ),
                {"path": f"/old/{n}.png", "sha": f"{n:064d}"},
            )
        model_id = conn.execute(text("SELECT id FROM models")).scalar_one()
        first = conn.execute(text("SELECT min(id) FROM images")).scalar_one()
        conn.execute(
            text("INSERT INTO index_entries (model_id, image_id, vector) VALUES (:m, :i, :v)"),
            {"m": model_id, "i": first, "v": np.zeros(2, np.float32).tobytes()},
        )
    old.dispose()
    store = Store(url)  # opening a library at an older revision upgrades it
    assert store.entry_novelty(model_id, [first]) == {first: None}
    assert store.novelties(model_id) == []  # no population yet: a query's percentile is None
    store.write_batch({model_id: [(first + 1, np.ones(2, np.float32).tobytes(), 123.5)]})
    assert store.novelties(model_id) == [123.5]
    assert store.entry_novelty(model_id, [first, first + 1]) == {first: None, first + 1: 123.5}
    store.close()
    engine = make_engine(url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0004")
    assert "novelty" not in {c["name"] for c in inspect(engine).get_columns("index_entries")}
    engine.dispose()


# -- models that know the shapes: in distribution and out ----------------------------------------------


@pytest.mark.slow
@pytest.mark.sqlite_only  # training is the slow part; the store's side runs on both above
@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_shapes_rank_low_and_noise_above_the_99th_percentile(learnt: tuple[Engine, Path, Path], kind: str) -> None:
    engine, _, held_out = learnt
    shapes = [engine.query_bytes(p.read_bytes(), kind, k=3) for p in sorted(held_out.rglob("*.png"))]
    ranks = [s.ood_percentile for s in shapes]
    assert all(r is not None and r < 99 for r in ranks), sorted(ranks)[-5:]
    # Unseen images rank higher than the training images they are compared with (the model fits what it
    # saw), yet none is out: measured here, 3.8 to 97.5, median about 47.
    assert float(np.median(np.asarray(ranks, dtype=float))) < 70, ranks
    assert all(s.warning is None for s in shapes)
    for seed in (3, 4):
        noise = engine.query_bytes(noise_png(seed), kind, k=3)
        assert noise.ood_percentile is not None and noise.ood_percentile > 99, noise.ood_percentile
        assert noise.warning == OOD_WARNING and len(noise.results) == 3  # still answered


def typical(engine: Engine, held_out: Path, kind: str) -> Path:
    """The held-out shape the model finds most ordinary (the others are checked above)."""
    paths = sorted(held_out.rglob("*.png"))
    return min(paths, key=lambda p: engine.query_bytes(p.read_bytes(), kind, k=1).ood_percentile or 0.0)


@pytest.mark.slow
@pytest.mark.sqlite_only
def test_the_cli_reports_the_percentile_and_warns(learnt: tuple[Engine, Path, Path], tmp_path: Path) -> None:
    engine, home, held_out = learnt
    engine.flush()  # the index files on disk, for the CLI's own Engine
    shape = str(typical(engine, held_out, "vae"))
    noise = tmp_path / "noise.png"
    noise.write_bytes(noise_png())
    run = CliRunner().invoke(main, ["--home", str(home), "query", shape, str(noise), "--model", "vae", "--json"])
    assert run.exit_code == 0, run.output
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["query"] for line in lines] == [shape, str(noise)]
    assert lines[0]["ood_percentile"] < 99 and lines[0]["warning"] is None
    assert lines[1]["ood_percentile"] > 99 and lines[1]["warning"] == OOD_WARNING
    run = CliRunner().invoke(main, ["--home", str(home), "query", shape, str(noise), "--model", "ae", "-k", "2"])
    assert run.exit_code == 0, run.output
    assert run.stdout.count("novelty: percentile ") == 2
    [warning] = [line for line in run.stderr.splitlines() if line.startswith("warning:")]  # one line, the noise's
    assert warning.startswith(f"warning: {noise}: {OOD_WARNING} (novelty percentile ") and warning.endswith(
        ", above 99)"
    )
    assert run.stdout.count("of the model's indexed images, above 99: out of distribution") == 1  # the noise's table
    run = CliRunner().invoke(main, ["--home", str(home), "query", str(noise), "--model", "pixels", "--json"])
    assert json.loads(run.stdout)["ood_percentile"] is None and "novelty" not in run.stderr


@pytest.mark.slow
@pytest.mark.sqlite_only
def test_the_api_gives_the_percentile_and_the_warning(learnt: tuple[Engine, Path, Path]) -> None:
    engine, _, held_out = learnt
    shape = typical(engine, held_out, "ae").read_bytes()
    with TestClient(create_app(engine), base_url="http://localhost") as client:

        def search(data: bytes, model: str) -> dict[str, object]:
            response = client.post("/api/search", files={"file": ("q.png", data)}, data={"model": model, "k": "3"})
            assert response.status_code == 200, response.text
            return dict(response.json())

        ood = search(noise_png(), "vae")
        assert isinstance(ood["ood_percentile"], float) and ood["ood_percentile"] > 99
        assert ood["warning"] == OOD_WARNING
        fine = search(shape, "ae")
        assert isinstance(fine["ood_percentile"], float) and fine["ood_percentile"] < 99 and fine["warning"] is None
        assert search(shape, "pixels")["ood_percentile"] is None
        top = fine["results"][0]["id"]  # type: ignore[index]
        by_id = client.get("/api/search", params={"image_id": top, "model": "ae", "k": 2}).json()
        assert set(by_id) == {"model", "results", "ood_percentile", "warning"}
        assert 0 < by_id["ood_percentile"] <= 100 and by_id["warning"] is None
