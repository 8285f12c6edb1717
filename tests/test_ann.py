"""Index types (flat, hnsw, ivf, ivfpq): built from the stored vectors by ``reindex``, tuned to a
target recall, kept in step with adds and removals, recorded in the database and rebuilt with
the recorded type when the file is gone. Small seeded random vectors, made in code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedsearch.cli.main import main
from embedsearch.core import ann
from embedsearch.engine import Engine
from embedsearch.errors import InvalidArgumentError
from helpers import noise_image, png_bytes, vector_library

#: Every test here runs on both metadata stores (conftest.py: ``database``).

APPROXIMATE = ["hnsw", "ivf", "ivfpq"]
G = 2**30


def exact(engine: Engine, queries: np.ndarray, k: int, name: str = "vecs") -> np.ndarray:
    """Image ids of the exact k nearest stored vectors (numpy, no FAISS)."""
    model = engine.model(name)
    rows = engine.store.entries_after(model.id, 0)
    ids = np.array([r[1] for r in rows])
    stored = np.frombuffer(b"".join(r[2] for r in rows), np.float32).reshape(len(rows), -1)
    d2 = ((queries[:, None, :] - stored[None]) ** 2).sum(-1)
    return ids[np.argsort(d2, axis=1)[:, :k]]


def neighbour_ids(engine: Engine, queries: np.ndarray, k: int = 10, name: str = "vecs") -> list[list[int]]:
    return [[n.id for n in row] for row in engine.search_vectors(queries, name, k)]


# -- the auto rule ------------------------------------------------------------------------------
def test_auto_is_a_rule_of_size_dimension_and_memory() -> None:
    assert ann.choose(50_000, 32, 4 * G) == "flat"
    assert ann.choose(99_999, 3072, 1 * G) == "flat"  # below ~100k exact search is cheap whatever it costs
    assert ann.choose(1_000_000, 32, 4 * G) == "hnsw"
    assert ann.choose(10_000_000, 32, 4 * G) == "ivfpq"  # HNSW32 would take ~4.6 GB
    assert ann.choose(10_000_000, 32, 64 * G) == "hnsw"
    assert ann.choose(1_000_000, 3072, 4 * G) == "ivfpq"
    assert ann.estimate_bytes("ivfpq", 10**7, 32) < ann.estimate_bytes("hnsw", 10**7, 32)
    assert ann.nlist_for(1_000_000) == 4096 and ann.nlist_for(1000) == 25  # 4 sqrt(n), >= 39 per list
    assert ann.pq_m_for(32) == 16 and 3072 % ann.pq_m_for(3072) == 0


def test_memory_sizes_parse_and_bad_ones_are_refused() -> None:
    assert ann.parse_memory("4G") == 4 * G
    assert ann.parse_memory("512m") == 512 * 2**20
    assert ann.parse_memory("1.5GB") == int(1.5 * G)
    assert ann.parse_memory("2GiB") == 2 * G
    assert ann.parse_memory("1000") == 1000
    for bad in ("4Q", "", "G", "-1G", "0"):
        with pytest.raises(InvalidArgumentError, match="not a size"):
            ann.parse_memory(bad)


# -- build, save, load ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", *APPROXIMATE])
def test_each_type_round_trips_through_its_file(engine: Engine, home: Path, kind: str) -> None:
    x = vector_library(engine, 3000)
    result = engine.reindex("vecs", kind)
    assert result.type == kind and result.vectors == 3000
    queries = x[:20] + 0.01
    before = engine.search_vectors(queries, "vecs", 10)
    engine.close()
    sidecar = json.loads((home / "indexes" / "vecs.faiss.json").read_text())
    assert sidecar["index"]["type"] == kind and sidecar["index"]["params"] == result.params
    with Engine(home) as again:
        after = again.search_vectors(queries, "vecs", 10)
        index = again.vector_index("vecs")
        assert index.problem is None and index.spec.type == kind
        stored = set(again.store.entry_image_ids(again.model("vecs").id))
    assert [[(n.id, round(n.distance, 5)) for n in r] for r in after] == [
        [(n.id, round(n.distance, 5)) for n in r] for r in before
    ]
    assert all(len(r) == 10 and {n.id for n in r} <= stored for r in after)  # image ids, never -1


@pytest.mark.parametrize("kind", APPROXIMATE)
def test_tuned_index_reaches_the_target_recall_on_held_out_queries(engine: Engine, kind: str) -> None:
    vector_library(engine, 6000)
    result = engine.reindex("vecs", kind, target_recall=0.95, seed=3)
    assert result.recall is not None and result.recall >= 0.95 and result.queries == 600
    recorded = next(m.index for m in engine.models() if m.name == "vecs")
    assert recorded == {"type": kind, "params": result.params, "recall": result.recall}
    assert set(result.params) >= ({"efSearch"} if kind == "hnsw" else {"nlist", "nprobe"})
    # Fresh queries from the same distribution, never stored: the recall holds for them too.
    queries = np.random.default_rng(99).standard_normal((200, 32)).astype(np.float32)
    found, truth = neighbour_ids(engine, queries), exact(engine, queries, 10)
    measured = np.mean([len(set(f) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)])
    assert measured >= 0.92, measured


def test_auto_keeps_a_small_library_flat_and_records_it(engine: Engine) -> None:
    vector_library(engine, 500)
    result = engine.reindex("vecs", "auto", memory="1G")
    assert (result.type, result.chosen_by, result.recall, result.memory_budget) == ("flat", "auto", 1.0, G)
    assert engine.model("vecs").index_spec is None  # null in the database: flat


# -- adds and removals -------------------------------------------------------------------------
def pixel_library(engine: Engine, n: int) -> list[int]:
    """A 4x4 grey pixels model (16-d) with ``n`` random uploads: their image ids."""
    engine.open(create=True)
    engine.store.add_model(name="px", kind="pixels", config={}, dim=16, metric="l2", image_size=4, channels=1)
    return [engine.add_image(png_bytes(noise_image(i, 4, "L")), models=["px"]).id for i in range(n)]


@pytest.mark.parametrize("kind", APPROXIMATE)
def test_adds_go_into_the_trained_index_and_removed_images_never_come_back(engine: Engine, kind: str) -> None:
    ids = pixel_library(engine, 400)
    engine.reindex("px", kind, target_recall=0.9)
    trained = engine.vector_index("px").index
    new = png_bytes(noise_image(10_000, 4, "L"))
    added = engine.add_image(new, models=["px"]).id
    index = engine.vector_index("px")
    assert index.index is trained and len(index) == 401  # added to the trained index, not rebuilt
    assert engine.search_bytes(new, "px", k=1)[0].id == added
    gone = ids[:30]
    for image_id in gone:
        engine.delete_image(image_id)
    assert index.masked == 30 and len(index) == 371 and index.index is trained
    for image_id in gone[:5]:
        assert image_id not in [n.id for n in engine.search_image(ids[40], "px", k=400)]
    hits = {n.id for r in engine.search_vectors(np.random.default_rng(1).random((50, 16)), "px", 400) for n in r}
    assert not hits & set(gone) and -1 not in hits
    assert engine.check().ok


def test_past_the_mask_threshold_the_index_is_rebuilt_with_its_type(engine: Engine, home: Path) -> None:
    ids = pixel_library(engine, 200)
    engine.reindex("px", "hnsw", target_recall=0.9)
    engine.remove_generated()  # nothing; the writing block settles
    for image_id in ids[: int(0.25 * len(ids))]:  # 25 % masked > 20 %: rebuilt from the database
        engine.delete_image(image_id)
    index = engine.vector_index("px")
    assert index.spec.type == "hnsw" and index.masked < 0.2 * 200 and len(index) == 150
    assert set(index.ids().tolist()) == set(ids[50:])


# -- crash safety ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_a_missing_index_file_is_rebuilt_with_the_recorded_type(engine: Engine, home: Path, kind: str) -> None:
    x = vector_library(engine, 3000)
    result = engine.reindex("vecs", kind)
    engine.close()
    (home / "indexes" / "vecs.faiss").unlink()  # as if killed before the first save, or deleted
    with Engine(home) as again:
        found = neighbour_ids(again, x[:10], 1)
        index = again.vector_index("vecs")
        assert index.spec.type == kind and index.spec.params == result.params and len(index) == 3000
    assert [f[0] for f in found] == [f[0] for f in exact(again, x[:10], 1).tolist()]
    sidecar = json.loads((home / "indexes" / "vecs.faiss.json").read_text())
    assert sidecar["index"]["type"] == kind  # saved again, with its type


# -- the command line --------------------------------------------------------------------------
def cli(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--home", str(home), *args])
    return result.exit_code, result.output


def test_reindex_from_the_command_line_and_what_info_and_models_show(engine: Engine, home: Path) -> None:
    vector_library(engine, 2000)
    engine.store.add_model(name="ph", kind="phash", config={}, dim=64, metric="hamming", image_size=32, channels=1)
    engine.close()
    code, out = cli(home, "reindex", "--model", "vecs", "--index", "hnsw", "--json")
    assert code == 0, out
    choice = json.loads(out)
    assert (choice["type"], choice["chosen_by"], choice["vectors"]) == ("hnsw", "user", 2000)
    assert choice["recall"] >= 0.95 and choice["params"]["M"] == 32
    code, out = cli(home, "models", "--json")
    shown = {m["name"]: m["index"] for m in json.loads(out)}
    assert shown["vecs"] == {"type": "hnsw", "params": choice["params"], "recall": choice["recall"]}
    assert shown["ph"]["type"] == "flat"
    code, out = cli(home, "info", "--json")
    assert next(m for m in json.loads(out)["models"] if m["name"] == "vecs")["index"]["type"] == "hnsw"
    code, out = cli(home, "info")
    assert code == 0 and "hnsw M=32" in out
    for args, says in (
        (["--model", "vecs", "--index", "annoy"], "unknown index type"),
        (["--model", "ph", "--index", "hnsw"], "keeps a flat index"),
        (["--model", "vecs", "--memory", "4Q"], "not a size"),
    ):
        code, out = cli(home, "reindex", *args)
        assert code != 0 and says in out and len(out.strip().splitlines()) == 1, out


def test_duplicates_and_check_work_on_an_approximate_index(engine: Engine) -> None:
    ids = pixel_library(engine, 300)
    engine.reindex("px", "hnsw", target_recall=0.9)
    engine.delete_image(ids[5])  # masked in the HNSW index
    report = engine.duplicates("px", k=2)  # grouping scans an exact copy of the live vectors
    assert report.vectors == 299
    assert ids[5] not in {image.id for group in report.groups for image in group.images}
    assert engine.check().ok


def test_check_finds_a_file_of_another_type_than_the_recorded_one(engine: Engine, home: Path) -> None:
    pixel_library(engine, 300)
    engine.reindex("px", "hnsw", target_recall=0.9)
    model = engine.model("px")
    engine.store.set_index_spec(model.id, {"type": "ivf", "params": {"nlist": 16, "nprobe": 4}, "recall": None})
    engine.close()
    with Engine(home) as again:
        report = again.check()
        assert not report.ok and any("is a hnsw index" in p for p in report.problems), report.problems
        again.check(repair=True)
        assert again.check().ok and again.vector_index("px").spec.type == "ivf"
