from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedsearch.core.store import Store
from embedsearch.core.vectors import VectorIndex, atomic_write


def vectors(n: int, dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_search_returns_image_ids_and_euclidean_distances() -> None:
    index = VectorIndex(4)
    x = vectors(10)
    index.add(np.arange(100, 110), x)
    dist, ids = index.search(x[3:4], 3)
    assert ids[0, 0] == 103 and dist[0, 0] == 0.0
    assert np.isclose(dist[0, 1], np.linalg.norm(x[3] - x[ids[0, 1] - 100]), atol=1e-5)


def test_fewer_vectors_than_k_gives_minus_one() -> None:
    index = VectorIndex(4)
    index.add(np.array([1, 2]), vectors(2))
    _, ids = index.search(vectors(1, seed=5), 4)
    assert list(ids[0, 2:]) == [-1, -1]


def test_cosine_ignores_vector_length() -> None:
    index = VectorIndex(4, "cosine")
    x = vectors(5)
    index.add(np.arange(5), x)
    dist, ids = index.search(x[2:3] * 7.5, 1)
    assert ids[0, 0] == 2 and dist[0, 0] == pytest.approx(0.0, abs=1e-6)


def test_save_load_round_trip(tmp_path: Path) -> None:
    index = VectorIndex(4)
    index.add(np.arange(50), vectors(50))
    index.stamp.last_entry_id, index.stamp.count = 50, 50
    path = tmp_path / "m.faiss"
    index.save(path)
    loaded = VectorIndex.load(path, 4, "l2")
    assert len(loaded) == 50 and loaded.stamp == index.stamp
    q = vectors(3, seed=9)
    assert np.array_equal(loaded.search(q, 5)[1], index.search(q, 5)[1])
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_corrupt_file_loads_empty_to_be_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "m.faiss"
    path.write_bytes(b"garbage")
    assert len(VectorIndex.load(path, 4, "l2")) == 0


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    atomic_write(path, b"old")
    atomic_write(path, b"new contents")
    assert path.read_bytes() == b"new contents"


def test_sync_catches_up_with_the_database(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lib.db'}")
    model = store.add_model(name="m", kind="pixels", config={}, dim=4, metric="l2", image_size=2, channels=1)
    x = vectors(6)
    images = [
        {
            "path": f"/{i}.png",
            "sha256": f"{i:064d}",
            "width": 2,
            "height": 2,
            "format": "PNG",
            "mode": "L",
            "label": None,
            "bytes": 1,
            "mtime": 0.0,
        }
        for i in range(6)
    ]
    ids = store.write_batch({model.id: [(im["sha256"], v.tobytes()) for im, v in zip(images, x, strict=False)]}, images)
    index = VectorIndex(4)
    assert index.sync(store, model.id) and len(index) == 6
    assert not index.sync(store, model.id)  # nothing new
    # A deletion and a re-encoded vector that the index file never saw:
    store.delete_images([ids[images[0]["sha256"]]])
    store.write_batch({model.id: [(ids[images[1]["sha256"]], (x[1] + 10).tobytes())]})
    index.sync(store, model.id)
    assert len(index) == 5
    assert np.allclose(index.reconstruct(ids[images[1]["sha256"]]), x[1] + 10)
