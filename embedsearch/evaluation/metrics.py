"""Retrieval metrics over exact (flat) FAISS search: pure numpy and faiss, no torch.

Indexes and search go through :mod:`embedsearch.core.knn`, the same helper the library's indexes
use, so a metric means the same here as in a query.

Conventions: the database holds ``N`` vectors with integer labels ``db_labels`` (N,); the queries
have ``query_labels`` (Q,). A neighbour list is a (Q, K) int64 array of database rows, best first,
padded with -1 when the database holds fewer than K usable items. Self-matches (a database item
with exactly the query's pixels) are given as ``exclude`` pairs (M, 2) of (query row, database row)
and are removed before any rank is counted.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import faiss
import numpy as np

from embedsearch.core import knn
from embedsearch.evaluation.transforms import augment as augment  # re-exported: the mixed near-duplicate
from embedsearch.results import METRICS as METRICS  # re-exported: the metrics an index can use

# -- search -------------------------------------------------------------------------------------


def build_index(vectors: np.ndarray, metric: str = "l2") -> faiss.Index:
    """An in-memory exact index (:func:`embedsearch.core.knn.flat_index`): L2, or inner product over
    unit vectors for cosine, or a binary index of packed bits for hamming."""
    x = knn.prepare(vectors, metric)
    index = knn.flat_index(knn.dim_of(x, metric), metric)
    index.add(x)
    return index


def add_vectors(index: faiss.Index, vectors: np.ndarray, metric: str = "l2") -> None:
    """Append rows to an index made by :func:`build_index` (same metric); they get the next row numbers."""
    index.add(knn.prepare(vectors, metric))


def search(index: faiss.Index, queries: np.ndarray, k: int, metric: str = "l2") -> np.ndarray:
    """(Q, k) database rows of the nearest items, best first, -1 where there are fewer than k."""
    _, ids = knn.search(index, knn.prepare(queries, metric), k, metric)
    return ids


def identical_pairs(query_images: np.ndarray, db_images: np.ndarray) -> np.ndarray:
    """(M, 2) int64 (query row, database row) of every pair with exactly the same pixels."""
    digest: dict[bytes, list[int]] = {}
    for j, image in enumerate(db_images):
        digest.setdefault(hashlib.blake2b(image.tobytes(), digest_size=16).digest(), []).append(j)
    pairs = [
        (i, j)
        for i, image in enumerate(query_images)
        for j in digest.get(hashlib.blake2b(image.tobytes(), digest_size=16).digest(), [])
    ]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _group(pairs: np.ndarray) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for q, j in pairs.tolist():
        out.setdefault(q, set()).add(j)
    return out


def neighbours(
    index: faiss.Index, queries: np.ndarray, k: int, metric: str = "l2", exclude: np.ndarray | None = None
) -> np.ndarray:
    """Top-k database rows of each query (Q, k), with the ``exclude`` pairs removed, -1 padded."""
    groups = _group(exclude) if exclude is not None and len(exclude) else {}
    extra = max((len(s) for s in groups.values()), default=0)
    # Search deep enough that k items are left after dropping a query's self-matches.
    depth = min(k + extra, max(int(index.ntotal), 1))
    ids = search(index, queries, depth, metric)
    out = np.full((len(ids), k), -1, dtype=np.int64)
    out[:, : min(k, depth)] = ids[:, :k]
    for q, drop in groups.items():
        kept = [j for j in ids[q].tolist() if j >= 0 and j not in drop][:k]
        out[q] = -1
        out[q, : len(kept)] = kept
    return out


# -- label metrics --------------------------------------------------------------------------------


def hit_matrix(ids: np.ndarray, db_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """(Q, K) bool: neighbour j of query q exists and shares its label."""
    labels = np.where(ids >= 0, db_labels[np.maximum(ids, 0)], -1)  # (Q, K)
    return (ids >= 0) & (labels == query_labels[:, None])


def relevant_counts(db_labels: np.ndarray, query_labels: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """(Q,) number of same-label database items per query, minus its excluded self-matches."""
    per_label = np.bincount(db_labels, minlength=int(max(db_labels.max(initial=0), query_labels.max(initial=0))) + 1)
    counts = per_label[query_labels].astype(np.int64)
    if exclude is not None and len(exclude):
        same = db_labels[exclude[:, 1]] == query_labels[exclude[:, 0]]
        np.subtract.at(counts, exclude[same, 0], 1)
    return counts


def precision_at(hits: np.ndarray, k: int) -> float:
    """Mean over queries of (same-label items among the top k) / k."""
    return float(hits[:, :k].sum(axis=1).mean() / k) if len(hits) else 0.0


def precision_curve(hits: np.ndarray, max_k: int) -> list[float]:
    """precision@k for k = 1 .. max_k (columns beyond the list count as misses)."""
    if not len(hits):
        return [0.0] * max_k
    padded = np.zeros((len(hits), max_k), dtype=bool)
    width = min(max_k, hits.shape[1])
    padded[:, :width] = hits[:, :width]
    per_k = np.cumsum(padded, axis=1).mean(axis=0) / np.arange(1, max_k + 1)
    return [float(v) for v in per_k]


def map_at(hits: np.ndarray, k: int, relevant: np.ndarray) -> float:
    """Mean average precision over the top k, each AP divided by min(k, relevant); 0 if none is relevant."""
    h = hits[:, :k].astype(np.float64)  # (Q, k)
    prec = np.cumsum(h, axis=1) / np.arange(1, h.shape[1] + 1)  # precision at each rank
    norm = np.minimum(k, relevant).astype(np.float64)
    ap = np.divide((prec * h).sum(axis=1), norm, out=np.zeros(len(h)), where=norm > 0)
    return float(ap.mean()) if len(h) else 0.0


def recall_at(hits: np.ndarray, k: int) -> float:
    """Fraction of queries with at least one same-label item in the top k."""
    return float(hits[:, :k].any(axis=1).mean()) if len(hits) else 0.0


def knn_predict(ids: np.ndarray, db_labels: np.ndarray, k: int) -> np.ndarray:
    """(Q,) majority label of the top k; a tie goes to the tied label ranked nearest (-1: no neighbours).

    Each position j scores count(label_j among the top k) * (k + 1) - j, so the most frequent label
    wins and, among equally frequent ones, the one whose first occurrence is nearest.
    """
    top = ids[:, :k]
    labels = np.where(top >= 0, db_labels[np.maximum(top, 0)], -1)  # (Q, k)
    counts = (labels[:, :, None] == labels[:, None, :]).sum(axis=2)  # (Q, k): frequency of each entry
    score = np.where(labels >= 0, counts * (k + 1) - np.arange(labels.shape[1]), -1)
    return labels[np.arange(len(labels)), score.argmax(axis=1)]  # all -1 when a row has no neighbours


def knn_accuracy(ids: np.ndarray, db_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Fraction of queries whose k-NN majority label (tie: nearest) equals their own."""
    return float((knn_predict(ids, db_labels, k) == query_labels).mean()) if len(ids) else 0.0


# -- near duplicates --------------------------------------------------------------------------------


def neardup_recall(ids: np.ndarray, n_db: int, ks: Sequence[int], also: np.ndarray | None = None) -> dict[int, float]:
    """Recall@k of altered queries searched over database + originals (row n_db + q is query q's original).

    ``also`` (M, 2) pairs (query, database row) count as hits too: a database item with exactly the
    original's pixels is the same picture.
    """
    target = ids == (n_db + np.arange(len(ids)))[:, None]  # (Q, K)
    if also is not None and len(also):
        for q, same in _group(also).items():
            target[q] |= np.isin(ids[q], list(same))
    return {k: float(target[:, :k].any(axis=1).mean()) if len(ids) else 0.0 for k in ks}


# -- models ---------------------------------------------------------------------------------------


def mse_per_pixel(images: np.ndarray, reconstructions: np.ndarray) -> float:
    """Mean squared error per pixel value, both scaled to [0, 1]."""
    a = images.astype(np.float32) / 255.0
    b = reconstructions.astype(np.float32) / 255.0
    return float(np.mean(np.square(a - b), dtype=np.float64))


def gaussian_kl(mu: np.ndarray, logvar: np.ndarray) -> float:
    """Mean over images of KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dimensions (nats)."""
    mu64, lv = mu.astype(np.float64), logvar.astype(np.float64)
    return float((0.5 * (mu64**2 + np.exp(lv) - 1.0 - lv).sum(axis=1)).mean()) if len(mu) else 0.0


def active_dims(mu: np.ndarray, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies over the data: Var(mu_d) > threshold."""
    return int((mu.astype(np.float64).var(axis=0) > threshold).sum()) if len(mu) else 0


@contextmanager
def one_thread() -> Iterator[None]:
    """FAISS, and torch if an encoder has loaded it (never imported here), on one thread for a while."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else 0
    faiss.omp_set_num_threads(1)
    if torch is not None:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(knn.all_threads())
        if torch is not None:
            torch.set_num_threads(before)


def time_single_queries(
    encode: Callable[[np.ndarray], np.ndarray],
    index: faiss.Index,
    images: np.ndarray,
    k: int,
    metric: str = "l2",
    repeats: int = 200,
) -> float:
    """Median milliseconds of one query (encode one image + search) on one thread.

    One thread, because an interactive query runs alone and threads only add overhead to it.
    """
    if not len(images):
        return 0.0
    with one_thread():
        encode(images[:1])  # warm-up: first-call allocations are not a query's cost
        samples = []
        for i in range(repeats):
            started = time.perf_counter()
            vector = knn.prepare(encode(images[i % len(images)][None]), metric)
            knn.search(index, vector, k, metric)
            samples.append(time.perf_counter() - started)
    return float(np.median(samples) * 1000.0)
