"""Near-duplicate groups: close pairs from FAISS range search in query chunks, then union-find.

Nothing here is ever N x N: each chunk of stored vectors is range-searched against the whole index
and only the pairs within the threshold are kept, so memory grows with the number of close pairs.
Above :data:`EXACT_WORK` (N^2 * dim) the search runs on an IVF copy of the vectors instead of the
flat index (approximate: a close pair split between two cells that are not probed is missed).

Distances are the ones ``query`` reports: Euclidean for l2, 1 - cos for cosine. The functions take
any flat FAISS index (or an ``IndexIDMap2`` of one: ids are then its ids, otherwise row numbers),
so the library, the benchmarks and the tests all run the same code.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from embedsearch.core import knn
from embedsearch.errors import InvalidArgumentError
from embedsearch.results import BINARY_METRICS, METRICS

log = logging.getLogger(__name__)

#: Stored vectors searched per range-search call (fewer while the threshold's density is unknown).
CHUNK = 4096
#: Range-search results one chunk may produce before the next chunk is made smaller (~100 MB).
RESULT_BUDGET = 8_000_000
#: More close pairs than this means the threshold groups most of the library: refused.
MAX_PAIRS = 10_000_000
#: Above N^2 * dim of this, pairs come from an IVF copy (seconds) instead of the exact index (minutes).
EXACT_WORK = 4e11
#: IVF search: cells probed per query (of 4 * sqrt(N) cells).
NPROBE = 16
#: Default threshold: this fraction of the median distance to the 10th neighbour (Euclidean scale),
#: over a seeded sample of the library; see the README ("Near-duplicate groups") for how it was chosen.
FRACTION = 0.25
CALIBRATION_K = 10
CALIBRATION_SAMPLE = 2000
#: Relative tolerance of a threshold (see :func:`radius`).
SLACK = 1e-5


@dataclass
class Grouping:
    """What :func:`find_groups` found: each group's ids, representative (lowest id) first, and each
    member's distance to the representative, in ``query``'s units."""

    threshold: float | None
    k: int | None
    method: str  # "exact" or "ivf"
    vectors: int
    pairs: int
    groups: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    seconds: float = 0.0


# -- metrics --------------------------------------------------------------------------------------
# Binary codes (phash, dhash: Hamming distance in faiss.IndexBinary*) are always searched exactly:
# a binary flat scan is a popcount per byte, fast enough at any library size here.


def check(metric: str) -> None:
    """Refuse a metric this module cannot range-search, with one clear line."""
    if metric not in METRICS:
        raise InvalidArgumentError(
            f"duplicates does not support the metric {metric!r}; use one of {', '.join(METRICS)}"
        )


def radius(metric: str, threshold: float) -> float:
    """FAISS's range-search radius for a distance ``threshold``: squared L2, or the inner-product
    floor ``1 - threshold`` for cosine (FAISS keeps scores above it). Inclusive, with a relative
    slack of :data:`SLACK`: a batched range search computes distances in another order than a
    single query does, so a pair exactly at a distance ``query`` showed must not fall out by rounding."""
    check(metric)
    if metric == "l2":
        return float(threshold * threshold * (1.0 + 2 * SLACK) + 1e-12)
    if metric in BINARY_METRICS:  # FAISS keeps Hamming distances strictly below the radius
        return float(math.floor(threshold + SLACK) + 1)
    return float(1.0 - threshold * (1.0 + SLACK) - 1e-7)


def to_distance(metric: str, raw: np.ndarray) -> np.ndarray:
    """FAISS's scores as ``query`` distances (see :func:`embedsearch.core.knn.search`)."""
    check(metric)
    if metric == "l2":
        return np.sqrt(np.maximum(raw, 0.0)).astype(np.float32)
    if metric in BINARY_METRICS:
        return raw.astype(np.float32)
    return np.clip(1.0 - raw, 0.0, 2.0).astype(np.float32)


def euclidean(metric: str, distance: float) -> float:
    """A distance on the Euclidean scale (for unit vectors, 1 - cos = |a - b|^2 / 2); bits stay bits."""
    return math.sqrt(2.0 * max(distance, 0.0)) if metric == "cosine" else distance


def from_euclidean(metric: str, distance: float) -> float:
    return distance * distance / 2.0 if metric == "cosine" else distance


def _distances(metric: str, vectors: np.ndarray, rep: np.ndarray) -> np.ndarray:
    """Row-wise distance of ``vectors`` to ``rep`` (same shape), in ``query``'s units."""
    if metric == "l2":
        return np.sqrt(np.maximum(((vectors - rep) ** 2).sum(axis=1), 0.0))
    if metric in BINARY_METRICS:
        return np.unpackbits(np.bitwise_xor(vectors, rep), axis=1).sum(axis=1).astype(np.float32)
    return np.clip(1.0 - (vectors * rep).sum(axis=1), 0.0, 2.0)


# -- the vectors of an index ---------------------------------------------------------------------


class _Rows:
    """The stored vectors of a flat index (or IDMap2 of one), read in chunks, with their ids.

    Binary indexes hand out their codes as (N, d // 8) uint8 rows; float ones as (N, d) float32.
    """

    def __init__(self, given: Any) -> None:
        self.binary = isinstance(given, faiss.IndexBinary)
        self.flat: Any
        self.index: Any
        index: Any = faiss.downcast_IndexBinary(given) if self.binary else faiss.downcast_index(given)
        if isinstance(index, (faiss.IndexIDMap2, faiss.IndexBinaryIDMap2)):
            inner: Any = index.index
            self.flat = faiss.downcast_IndexBinary(inner) if self.binary else faiss.downcast_index(inner)
            self.ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        else:
            self.flat = index
            self.ids = np.arange(index.ntotal, dtype=np.int64)
        self.index = index
        self.dim = int(index.d)
        self.width = self.dim // 8 if self.binary else self.dim
        self.dtype: type[np.generic] = np.uint8 if self.binary else np.float32

    def __len__(self) -> int:
        return len(self.ids)

    def chunk(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.flat.reconstruct_n(start, stop - start), dtype=self.dtype).reshape(-1, self.width)

    def at(self, positions: np.ndarray) -> np.ndarray:
        if not len(positions):
            return np.zeros((0, self.width), self.dtype)
        if self.binary:  # IndexBinaryFlat has no reconstruct_batch
            return np.stack([self.flat.reconstruct(int(p)) for p in positions]).astype(np.uint8)
        return np.asarray(self.flat.reconstruct_batch(np.ascontiguousarray(positions, dtype=np.int64)), np.float32)


def _searcher(rows: _Rows, metric: str, exact: bool | None, seed: int) -> tuple[faiss.Index, str]:
    """The index to search: the flat one, or an IVF copy of it when exact search would take minutes."""
    if rows.binary or exact or (exact is None and float(len(rows)) ** 2 * rows.dim <= EXACT_WORK):
        return rows.index, "exact"
    check(metric)
    n = len(rows)
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    fmetric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    ivf = faiss.IndexIVFFlat(faiss.IndexFlat(rows.dim, fmetric), rows.dim, nlist, fmetric)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 64 * nlist), replace=False))
    ivf.cp.seed, ivf.cp.niter = seed, 10
    faiss.omp_set_num_threads(knn.all_threads())
    ivf.train(rows.at(sample))
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        ivf.add_with_ids(rows.chunk(start, stop), rows.ids[start:stop])
    ivf.nprobe = min(NPROBE, nlist)
    return ivf, "ivf"


# -- pairs ----------------------------------------------------------------------------------------


def range_pairs(
    index: faiss.Index, metric: str, threshold: float, chunk: int = CHUNK, searcher: faiss.Index | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of stored vectors within ``threshold`` of each other: (a, b, distance), a < b ids.

    The stored vectors are searched against ``searcher`` (default: ``index`` itself) ``chunk`` at a
    time; each chunk is sized from the results per query met so far, so that its results stay near
    :data:`RESULT_BUDGET` however dense the threshold, and more than :data:`MAX_PAIRS` pairs is refused.
    """
    if threshold < 0 or not math.isfinite(threshold):
        raise InvalidArgumentError(f"the threshold must be a distance of 0 or more, not {threshold}")
    rows = _Rows(index)
    searcher = rows.index if searcher is None else searcher
    r = radius(metric, threshold)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    total, start, step = 0, 0, max(1, min(chunk, RESULT_BUDGET // max(len(rows), 1)))
    faiss.omp_set_num_threads(knn.all_threads())
    while start < len(rows):
        stop = min(len(rows), start + step)
        lims, raw, hit = searcher.range_search(rows.chunk(start, stop), int(r) if rows.binary else r)
        query = np.repeat(rows.ids[start:stop], np.diff(lims).astype(np.int64))
        keep = hit != query
        a, b = np.minimum(query[keep], hit[keep]), np.maximum(query[keep], hit[keep])
        found.append((a, b, to_distance(metric, raw[keep])))
        total += int(keep.sum())
        if total > 2 * MAX_PAIRS:  # each pair is met from both of its ends
            raise InvalidArgumentError(
                f"threshold {threshold:g} pairs up too much of the library (over {MAX_PAIRS:,} pairs); lower it"
            )
        per_query = len(hit) / (stop - start)
        step = max(1, min(chunk, 2 * step, int(RESULT_BUDGET / max(per_query, 1.0))))
        start = stop
    return _unique(found)


def knn_pairs(
    index: faiss.Index, metric: str, k: int, chunk: int = CHUNK, searcher: faiss.Index | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mutual k-nearest-neighbour pairs: a and b each among the other's ``k`` nearest (self not counted)."""
    if k < 1:
        raise InvalidArgumentError("k must be at least 1")
    rows = _Rows(index)
    searcher = rows.index if searcher is None else searcher
    depth = min(k + 1, max(len(rows), 1))
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, len(rows), chunk):
        stop = min(len(rows), start + chunk)
        dist, hit = knn.search(searcher, _as_queries(rows, rows.chunk(start, stop)), depth, metric)
        query = np.repeat(rows.ids[start:stop], depth).reshape(-1, depth)
        keep = (hit >= 0) & (hit != query)
        # Self first, then the k nearest others: a row whose self is not ranked keeps only k.
        keep &= np.cumsum(keep, axis=1) <= k
        found.append((query[keep], hit[keep], dist[keep].astype(np.float32)))
    a, b, d = (np.concatenate(parts) for parts in zip(*found, strict=True)) if found else _empty()
    base = int(max(a.max(initial=0), b.max(initial=0))) + 1  # one int64 key per directed pair
    forward, backward = a * base + b, b * base + a
    mutual = np.isin(forward, backward) & (a < b)
    return a[mutual], b[mutual], d[mutual]


def _as_queries(rows: _Rows, vectors: np.ndarray) -> np.ndarray:
    """Stored vectors as queries: float32 copies as stored (already unit length for cosine), or codes."""
    return np.ascontiguousarray(vectors) if rows.binary else knn.prepare(vectors, "l2")


def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)


def _unique(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not parts:
        return _empty()
    a, b, d = (np.concatenate(p) for p in zip(*parts, strict=True))
    if not len(a):
        return _empty()
    order = np.lexsort((b, a))
    a, b, d = a[order], b[order], d[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], d[first]


# -- groups ---------------------------------------------------------------------------------------


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over pairs (a[i], b[i]): (nodes, root of each), roots being the lowest id of each group.

    Vectorised hooking and pointer jumping: every pass hooks the larger root of each pair under the
    smaller one, then flattens the trees; it stops when both ends of every pair share a root.
    """
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inverse[: len(a)], inverse[len(a) :]
    parent = np.arange(len(nodes))
    while True:
        ra, rb = parent[ia], parent[ib]
        if np.array_equal(ra, rb):
            return nodes, nodes[parent]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def calibrate(index: faiss.Index, metric: str, seed: int = 0, searcher: faiss.Index | None = None) -> float:
    """The default threshold: :data:`FRACTION` of the median distance from a seeded sample of stored
    vectors to their 10th nearest other vector, on the Euclidean scale (so cosine's is comparable)."""
    rows = _Rows(index)
    check(metric)
    if len(rows) < 2:
        return 0.0
    searcher = rows.index if searcher is None else searcher
    k = min(CALIBRATION_K, len(rows) - 1)
    positions = np.sort(np.random.default_rng(seed).choice(len(rows), min(len(rows), CALIBRATION_SAMPLE), False))
    dist, hit = knn.search(searcher, _as_queries(rows, rows.at(positions)), k + 1, metric)
    others = np.where(hit == rows.ids[positions][:, None], np.inf, dist)  # self does not count
    kth = np.sort(others, axis=1)[:, k - 1]
    kth = kth[np.isfinite(kth)]
    if not len(kth):
        return 0.0
    return from_euclidean(metric, FRACTION * euclidean(metric, float(np.median(kth))))


def find_groups(
    index: faiss.Index,
    metric: str,
    threshold: float | None = None,
    k: int | None = None,
    exact: bool | None = None,
    seed: int = 0,
    chunk: int = CHUNK,
) -> Grouping:
    """Near-duplicate groups among an index's vectors: pairs within ``threshold`` (default:
    :func:`calibrate`), or with ``k`` mutual k-nearest neighbours, joined by union-find.

    ``exact``: None chooses by size (see :data:`EXACT_WORK`), True always searches the flat index,
    False always an IVF copy. Groups come largest first, then by representative id.
    """
    if threshold is not None and k is not None:
        raise InvalidArgumentError("give a threshold or k, not both")
    started = time.perf_counter()
    rows = _Rows(index)
    searcher, method = _searcher(rows, metric, exact, seed)
    if k is not None:
        a, b, _ = knn_pairs(index, metric, k, chunk, searcher)
    else:
        threshold = calibrate(index, metric, seed, searcher) if threshold is None else threshold
        a, b, _ = range_pairs(index, metric, threshold, chunk, searcher)
    out = Grouping(threshold, k, method, len(rows), len(a))
    nodes, roots = components(a, b)
    out.groups = _measured(rows, metric, nodes, roots)
    out.seconds = time.perf_counter() - started
    log.debug("%d groups from %d close pairs among %d vectors (%s) in %.1f s", len(out.groups), out.pairs,
             len(rows), method, out.seconds)  # fmt: skip
    return out


def _measured(rows: _Rows, metric: str, nodes: np.ndarray, roots: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each group's ids, representative (its root: the lowest id) first and the rest by distance to it."""
    if not len(nodes):
        return []
    order = np.argsort(rows.ids, kind="stable")
    positions = order[np.searchsorted(rows.ids, nodes, sorter=order)]
    vectors = rows.at(positions)
    rep = vectors[np.searchsorted(nodes, roots)]
    dist = _distances(metric, vectors, rep)
    dist[nodes == roots] = 0.0
    by = np.lexsort((nodes, dist, nodes != roots, roots))  # group, representative first, distance, id
    roots, nodes, dist = roots[by], nodes[by], dist[by].astype(np.float32)
    starts = np.flatnonzero(np.r_[True, roots[1:] != roots[:-1]])
    groups = [(nodes[s:e], dist[s:e]) for s, e in zip(starts, np.r_[starts[1:], len(nodes)], strict=True)]
    groups.sort(key=lambda g: (-len(g[0]), int(g[0][0])))
    return groups
