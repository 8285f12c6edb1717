"""The one FAISS helper: metric checks, vector preparation, exact indexes and search.

Both the library's per-model index (:mod:`embedsearch.core.vectors`) and the evaluation's
in-memory indexes (:mod:`embedsearch.evaluation.metrics`) go through it, so cosine means the same
everywhere (unit vectors + inner product, distance 1 - cos) and threads are set in one place.
"""

from __future__ import annotations

import os
from typing import Any

import faiss
import numpy as np

from embedsearch.errors import InvalidArgumentError
from embedsearch.results import METRICS

_FAISS_METRIC = {"l2": faiss.METRIC_L2, "cosine": faiss.METRIC_INNER_PRODUCT}
#: Below this many queries one thread is fastest (no thread start-up); a batch uses every core.
BATCH_THREADS_FROM = 16


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise InvalidArgumentError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


def all_threads() -> int:
    """Cores this process may use (the affinity mask, not the machine's count, in a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare(vectors: np.ndarray, metric: str, dim: int | None = None) -> np.ndarray:
    """(N, dim) C-contiguous float32, a copy; unit length for cosine. ``dim``: reshape to it."""
    check_metric(metric)
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)  # a copy: normalising is in place
    if dim is not None:
        x = x.reshape(-1, dim)
    if x.ndim != 2:
        raise InvalidArgumentError(f"vectors must be a 2-D array, not of shape {x.shape}")
    if metric == "cosine":
        faiss.normalize_L2(x)
    return x


def flat_index(dim: int, metric: str) -> faiss.Index:
    """An empty exact index: L2, or inner product over unit vectors for cosine."""
    return faiss.IndexFlat(dim, _FAISS_METRIC[check_metric(metric)])


def search(
    index: faiss.Index, queries: np.ndarray, k: int, metric: str, params: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids), each (Q, k) for prepared ``queries``; id -1 (distance inf) means no result.

    Distances: Euclidean for l2, 1 - cos for cosine.
    """
    if k < 1:
        raise InvalidArgumentError("k must be at least 1")
    faiss.omp_set_num_threads(1 if len(queries) < BATCH_THREADS_FROM else all_threads())
    scores, ids = index.search(queries, k, params=params)
    dist = np.clip(1.0 - scores, 0.0, 2.0) if metric == "cosine" else np.sqrt(np.maximum(scores, 0.0))
    dist[ids < 0] = np.inf
    return dist, ids.astype(np.int64, copy=False)
