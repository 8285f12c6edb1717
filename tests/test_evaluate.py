"""Retrieval metrics against values worked out by hand on tiny constructed cases.

The main case: a 1-D database on a line, searched with exact L2.

    db row      0    1    2    3    4     5
    position    0    1    2    3    10    11
    label       0    0    1    1    1     0

    query A at 0.1  (label 0): order 0 1 2 3 4 5 -> hits 1 1 0 0 0 1
    query B at 10.2 (label 1): order 4 5 3 2 1 0 -> hits 1 0 1 1 0 0
    query C at 2.4  (label 0): order 2 3 1 0 4 5 -> hits 0 0 1 1 0 1
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from embedsearch.errors import InvalidArgumentError
from embedsearch.evaluation import metrics as ev

pytestmark = pytest.mark.no_store  # never opens a library

DB = np.array([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0]], dtype=np.float32)
DB_LABELS = np.array([0, 0, 1, 1, 1, 0])
QUERIES = np.array([[0.1], [10.2], [2.4]], dtype=np.float32)
Q_LABELS = np.array([0, 1, 0])


@pytest.fixture
def ids() -> np.ndarray:
    return ev.neighbours(ev.build_index(DB), QUERIES, 6)


@pytest.fixture
def hits(ids: np.ndarray) -> np.ndarray:
    return ev.hit_matrix(ids, DB_LABELS, Q_LABELS)


def test_neighbours_are_exact_and_padded(ids: np.ndarray) -> None:
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5], [4, 5, 3, 2, 1, 0], [2, 3, 1, 0, 4, 5]]
    deeper = ev.neighbours(ev.build_index(DB), QUERIES[:1], 8)
    assert deeper.tolist() == [[0, 1, 2, 3, 4, 5, -1, -1]]  # fewer items than k: -1 padding


def test_hit_matrix(hits: np.ndarray) -> None:
    assert hits.astype(int).tolist() == [[1, 1, 0, 0, 0, 1], [1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 1]]
    padded = ev.hit_matrix(np.array([[0, -1]]), DB_LABELS, np.array([0]))
    assert padded.tolist() == [[True, False]]  # a missing neighbour is never a hit


def test_precision_at_k(hits: np.ndarray) -> None:
    assert ev.precision_at(hits, 1) == pytest.approx((1 + 1 + 0) / 3)
    assert ev.precision_at(hits, 3) == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)  # 5/9


def test_precision_curve_matches_precision_at(hits: np.ndarray) -> None:
    curve = ev.precision_curve(hits, 8)
    assert len(curve) == 8
    for k in range(1, 7):
        assert curve[k - 1] == pytest.approx(ev.precision_at(hits, k))
    assert curve[7] == pytest.approx((3 + 3 + 3) / 3 / 8)  # ranks past the list count as misses


def test_map_at_k(hits: np.ndarray) -> None:
    relevant = ev.relevant_counts(DB_LABELS, Q_LABELS)
    assert relevant.tolist() == [3, 3, 3]
    # A: (1/1 + 2/2) / 3 = 2/3; B: (1/1 + 2/3) / 3 = 5/9; C: (1/3) / 3 = 1/9
    assert ev.map_at(hits, 3, relevant) == pytest.approx((2 / 3 + 5 / 9 + 1 / 9) / 3)
    # normalised by min(k, relevant): at k = 1 only the first rank counts, divided by 1
    assert ev.map_at(hits, 1, relevant) == pytest.approx(2 / 3)
    # no same-label item in the database: AP is 0, not a division by zero
    assert ev.map_at(hits[:1], 3, np.array([0])) == 0.0


def test_recall_at_k(hits: np.ndarray) -> None:
    assert ev.recall_at(hits, 1) == pytest.approx(2 / 3)  # C misses at rank 1
    assert ev.recall_at(hits, 2) == pytest.approx(2 / 3)
    assert ev.recall_at(hits, 3) == pytest.approx(1.0)


def test_knn_accuracy_and_ties(ids: np.ndarray) -> None:
    # k = 3: A votes [0 0 1] -> 0 (right), B [1 0 1] -> 1 (right), C [1 1 0] -> 1 (wrong)
    assert ev.knn_predict(ids, DB_LABELS, 3).tolist() == [0, 1, 1]
    assert ev.knn_accuracy(ids, DB_LABELS, Q_LABELS, 3) == pytest.approx(2 / 3)
    # k = 2: B votes [1 0], a tie: the label ranked nearest (1) wins
    assert ev.knn_predict(ids, DB_LABELS, 2).tolist() == [0, 1, 1]
    # k = 4: C votes [1 1 0 0], a 2-2 tie: 1 occurs first
    assert ev.knn_predict(ids, DB_LABELS, 4)[2] == 1


def test_knn_tie_goes_to_the_nearest_tied_label_not_the_first_rank() -> None:
    labels = np.array([2, 0, 1, 0, 1])
    row = np.array([[0, 1, 2, 3, 4]])  # votes 2, 0, 1, 0, 1: labels 0 and 1 tie with two votes
    assert ev.knn_predict(row, labels, 5).tolist() == [0]  # 0 is at rank 2, 1 only at rank 3
    assert ev.knn_predict(row, labels, 1).tolist() == [2]
    assert ev.knn_predict(np.array([[-1, -1]]), labels, 2).tolist() == [-1]  # no neighbours, no vote


def test_self_match_exclusion() -> None:
    # One-pixel images; the query has exactly the pixels of database row 1 (and of row 6, a copy).
    db_images = np.array([0, 12, 20, 30, 100, 110, 12], dtype=np.uint8).reshape(-1, 1, 1, 1)
    db_labels = np.array([0, 0, 1, 1, 1, 0, 0])
    query = np.array([12], dtype=np.uint8).reshape(1, 1, 1, 1)
    pairs = ev.identical_pairs(query, db_images)
    assert sorted(pairs.tolist()) == [[0, 1], [0, 6]]
    index = ev.build_index(db_images.reshape(-1, 1).astype(np.float32))
    q_vec = query.reshape(-1, 1).astype(np.float32)
    ids = ev.neighbours(index, q_vec, 3, exclude=pairs)
    assert ids.tolist() == [[2, 0, 3]]  # pixel 20 (distance 8), 0 (12), 30 (18); both copies left out
    hits = ev.hit_matrix(ids, db_labels, np.array([0]))
    relevant = ev.relevant_counts(db_labels, np.array([0]), pairs)
    assert relevant.tolist() == [2]  # rows 0 and 5; the two copies of the query do not count
    assert ev.precision_at(hits, 3) == pytest.approx(1 / 3)
    assert ev.map_at(hits, 3, relevant) == pytest.approx((1 / 2) / 2)  # one hit at rank 2, min(3, 2) = 2
    # without the exclusion the copies take the first two ranks
    plain = ev.neighbours(index, q_vec, 3)
    assert sorted(plain[0, :2].tolist()) == [1, 6]


def test_exclusion_pads_when_too_few_items_are_left() -> None:
    db = np.array([[5], [5], [9]], dtype=np.uint8).reshape(-1, 1, 1, 1)
    pairs = ev.identical_pairs(db[:1], db)
    ids = ev.neighbours(
        ev.build_index(db.reshape(-1, 1).astype(np.float32)), np.array([[5.0]], np.float32), 3, exclude=pairs
    )
    assert ids.tolist() == [[2, -1, -1]]


def test_cosine_ranks_by_angle_not_distance() -> None:
    db = np.array([[1.0, 0.0], [0.0, 1.0], [10.0, 1.0]], dtype=np.float32)
    q = np.array([[1.0, 0.1]], dtype=np.float32)
    assert ev.neighbours(ev.build_index(db, "l2"), q, 1, "l2").tolist() == [[0]]
    assert ev.neighbours(ev.build_index(db, "cosine"), q, 1, "cosine").tolist() == [[2]]
    with pytest.raises(InvalidArgumentError):
        ev.build_index(db, "hamming")


def test_neardup_recall() -> None:
    # 4 database rows; the originals of queries 0 and 1 are rows 4 and 5.
    ids = np.array([[4, 0, 1], [0, 5, 1]])
    assert ev.neardup_recall(ids, 4, (1, 2)) == {1: 0.5, 2: 1.0}
    # database row 0 has query 1's exact pixels: it is the same picture, so a hit at rank 1
    assert ev.neardup_recall(ids, 4, (1,), also=np.array([[1, 0]])) == {1: 1.0}


def test_augment_is_seeded_and_alters_moderately() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    a, b = ev.augment(grey, 3), ev.augment(grey, 3)
    assert a.shape == grey.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, ev.augment(grey, 4))
    # image i depends on (seed, i) only: a prefix alters the same
    assert np.array_equal(ev.augment(grey[:2], 3), a[:2])
    smooth = np.tile(np.linspace(40, 200, 32, dtype=np.uint8)[None, :, None], (32, 1, 3))[None]
    altered = ev.augment(smooth, 0)
    diff = np.abs(altered.astype(int) - smooth.astype(int)).mean()
    assert altered.shape == smooth.shape and 1 < diff < 60


def test_reconstruction_kl_and_active_dims() -> None:
    a = np.array([0, 255], dtype=np.uint8).reshape(1, 1, 2, 1)
    b = np.array([255, 255], dtype=np.uint8).reshape(1, 1, 2, 1)
    assert ev.mse_per_pixel(a, b) == pytest.approx(0.5)
    assert ev.gaussian_kl(np.zeros((3, 4)), np.zeros((3, 4))) == 0.0
    # 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2): mu 1 gives 0.5; sigma^2 = 2 gives 0.5 * (1 - ln 2)
    mu, logvar = np.array([[1.0, 0.0]]), np.array([[0.0, math.log(2.0)]])
    assert ev.gaussian_kl(mu, logvar) == pytest.approx(0.5 + 0.5 * (1 - math.log(2.0)))
    latents = np.stack([np.zeros(100), np.linspace(-0.25, 0.25, 100), np.linspace(-0.1, 0.1, 100)], axis=1)
    assert ev.active_dims(latents) == 1  # variances 0, ~0.021 and ~0.0034


def test_single_query_timing() -> None:
    index = ev.build_index(DB)
    ms = ev.time_single_queries(
        lambda x: x.reshape(len(x), -1).astype(np.float32), index, np.zeros((3, 1, 1, 1), np.uint8), 2, repeats=20
    )
    assert 0 < ms < 100
