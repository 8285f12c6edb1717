"""Browsing the library (embedsearch.core.browse): pages, labels, and the 2-D map of a model's vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedsearch.core import browse
from embedsearch.core.browse import project_2d
from embedsearch.engine import Engine
from embedsearch.errors import InvalidArgumentError, UnknownModelError
from helpers import noise_image, png_bytes, vector_library


@pytest.mark.no_store
def test_project_2d_finds_the_main_directions_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    # 200 points spread 10 along axis 3, 3 along axis 0, little elsewhere (6-d)
    x = rng.standard_normal((200, 6)) * np.array([3, 0.1, 0.1, 10, 0.1, 0.1])
    coords, explained = project_2d(x)
    assert coords.shape == (200, 2) and coords.dtype == np.float32
    assert explained[0] > explained[1] > 0.05 and sum(explained) > 0.98
    assert abs(np.corrcoef(coords[:, 0], x[:, 3])[0, 1]) > 0.99  # x: the widest direction
    assert abs(np.corrcoef(coords[:, 1], x[:, 0])[0, 1]) > 0.99
    again, _ = project_2d(x[::-1].copy())  # another order: the same point for each vector (signs fixed)
    assert np.allclose(again[::-1], coords, atol=1e-4)
    assert np.array_equal(project_2d(np.ones((5, 4)))[0], np.zeros((5, 2)))  # nothing varies: all at 0
    assert project_2d(np.ones((1, 4)))[0].shape == (1, 2)


def test_pages_and_labels(indexed: Engine) -> None:
    first = indexed.images(limit=10)
    assert first.total == 48 and len(first.images) == 10
    second = indexed.images(offset=10, limit=10)
    ids = [b.id for b in first.images + second.images]
    assert ids == sorted(ids) and len(set(ids)) == 20  # the order they were added, no repeats
    stars = indexed.images(label="star", limit=100)
    assert stars.total == 6 and {b.label for b in stars.images} == {"star"}
    assert all(b.name and b.name.startswith("star-") and b.name.endswith(".png") for b in stars.images)
    assert indexed.images(offset=48).images == []
    indexed.add_image(png_bytes(noise_image(3, 20)))  # no label
    counts = {c.label: c.count for c in indexed.labels()}
    assert counts[None] == 1 and len(counts) == 9 and all(counts[k] == 6 for k in counts if k is not None)
    assert indexed.labels()[-1].label is None  # ties by count: the unlabelled after the named
    for bad in ({"limit": 0}, {"limit": browse.MAX_PAGE + 1}, {"offset": -1}):
        with pytest.raises(InvalidArgumentError):
            indexed.images(**bad)  # type: ignore[arg-type]


def test_the_map_has_every_vector_with_its_label_and_follows_changes(indexed: Engine) -> None:
    made = indexed.vector_map("pixels")
    assert made.vectors == 48 and len(made.points) == 48 and len(made.explained) == 2
    assert {p.label for p in made.points} == {c.label for c in indexed.labels()}
    assert indexed.vector_map("pixels") is made  # cached while nothing changed
    gone = made.points[0].id
    indexed.delete_image(gone)
    after = indexed.vector_map("pixels")
    assert after.vectors == 47 and gone not in {p.id for p in after.points}
    with pytest.raises(UnknownModelError):
        indexed.vector_map("nope")


def test_the_map_samples_large_models_with_a_seed(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    vector_library(engine, 50, dim=16)
    monkeypatch.setattr(browse, "MAP_POINTS", 20)
    one = engine.vector_map("vecs")
    assert one.vectors == 50 and len(one.points) == 20
    engine.browser._maps.clear()
    assert [p.id for p in engine.vector_map("vecs").points] == [p.id for p in one.points]  # seeded
    assert [p.id for p in engine.vector_map("vecs", seed=1).points] != [p.id for p in one.points]


def test_a_hash_model_is_mapped_from_its_bits(engine: Engine, shapes: Path) -> None:
    engine.index(str(shapes), "phash", workers=0)  # 64-bit codes, 8 bytes each
    made = engine.vector_map("phash")
    assert len(made.points) == 48 and made.explained[0] > 0
    assert len({(round(p.x, 3), round(p.y, 3)) for p in made.points}) > 10  # not all on one spot
