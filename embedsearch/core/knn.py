"""The one FAISS helper: metric checks, vector preparation, exact indexes and search.

Both the library's per-model index (:mod:`embedsearch.core.vectors`) and the evaluation's
in-memory indexes (:mod:`embedsearch.evaluation.metrics`) go through it, so cosine means the same
everywhere (unit vectors + inner product, distance 1 - cos) and threads are set in one place.
Hamming is the metric of binary codes (``dim`` bits packed into ``dim // 8`` uint8 per vector):
they live in FAISS's binary indexes, and their distance is the number of bits that differ.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from embedsearch.errors import InvalidArgumentError
from embedsearch.results import BINARY_METRICS, METRICS

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


def is_binary(metric: str) -> bool:
    """Whether vectors of this metric are packed bits (uint8) rather than float32."""
    return check_metric(metric) in BINARY_METRICS


def code_dtype(metric: str) -> np.dtype[Any]:
    """The dtype of a vector's values, in an index and in the database's blobs."""
    return np.dtype(np.uint8) if is_binary(metric) else np.dtype(np.float32)


def code_bytes(dim: int, metric: str) -> int:
    """Bytes of one vector of ``dim`` values (binary: ``dim`` bits)."""
    return dim // 8 if is_binary(metric) else 4 * dim


def from_bytes(data: bytes, metric: str, dim: int) -> np.ndarray:
    """Concatenated vector blobs -> (N, width) array: float32 (width dim), or uint8 bits (dim // 8)."""
    width = dim // 8 if is_binary(metric) else dim
    return np.frombuffer(data, dtype=code_dtype(metric)).reshape(-1, width)


def dim_of(vectors: np.ndarray, metric: str) -> int:
    """The dimension of prepared (N, width) vectors: their width, or 8 bits per byte for binary codes."""
    return int(vectors.shape[1]) * (8 if is_binary(metric) else 1)


def prepare(vectors: np.ndarray, metric: str, dim: int | None = None) -> np.ndarray:
    """(N, dim) C-contiguous float32, a copy; unit length for cosine. ``dim``: reshape to it.

    Binary codes (hamming): (N, dim // 8) uint8 instead; values that are not bytes are refused.
    """
    if is_binary(metric):
        return _prepare_bits(vectors, dim)
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)  # a copy: normalising is in place
    if dim is not None:
        x = x.reshape(-1, dim)
    if x.ndim != 2:
        raise InvalidArgumentError(f"vectors must be a 2-D array, not of shape {x.shape}")
    if metric == "cosine":
        faiss.normalize_L2(x)
    return x


def _prepare_bits(vectors: np.ndarray, dim: int | None) -> np.ndarray:
    arr = np.asarray(vectors)
    # Casting floats to bytes would search garbage: binary codes are bytes (or integers that are bytes).
    bytes_ = (
        arr.dtype == np.uint8
        or not arr.size
        or np.issubdtype(arr.dtype, np.integer)
        and 0 <= arr.min() <= arr.max() <= 255
    )
    if not bytes_:
        raise InvalidArgumentError(f"binary codes must be uint8 bytes of packed bits, not {arr.dtype} values")
    x = np.array(arr, dtype=np.uint8, order="C", copy=True)
    if dim is not None:
        x = x.reshape(-1, dim // 8)
    if x.ndim != 2:
        raise InvalidArgumentError(f"binary codes must be a 2-D array, not of shape {x.shape}")
    return x


def faiss_metric(metric: str) -> int:
    """FAISS's metric of a float metric: L2, or inner product (over unit vectors) for cosine."""
    return int(_FAISS_METRIC[check_metric(metric)])


def flat_index(dim: int, metric: str) -> Any:
    """An empty exact index: L2, or inner product over unit vectors for cosine; for hamming a binary
    index of ``dim`` bits (a multiple of 8)."""
    if is_binary(metric):
        if dim % 8:
            raise InvalidArgumentError(f"a binary code has whole bytes: {dim} bits is not a multiple of 8")
        return faiss.IndexBinaryFlat(dim)
    return faiss.IndexFlat(dim, _FAISS_METRIC[check_metric(metric)])


def id_index(dim: int, metric: str) -> faiss.IndexIDMap2 | faiss.IndexBinaryIDMap2:
    """An empty exact index whose ids are the caller's (image ids), with remove and reconstruct."""
    flat = flat_index(dim, metric)
    return faiss.IndexBinaryIDMap2(flat) if is_binary(metric) else faiss.IndexIDMap2(flat)


def is_id_index(index: Any, metric: str) -> bool:
    """Whether ``index`` is of the kind :func:`id_index` makes for ``metric``."""
    return isinstance(index, faiss.IndexBinaryIDMap2 if is_binary(metric) else faiss.IndexIDMap2)


def serialize(index: Any, metric: str) -> bytes:
    """The index as bytes (FAISS writes binary and float indexes with functions of their own)."""
    data = faiss.serialize_index_binary(index) if is_binary(metric) else faiss.serialize_index(index)
    return bytes(data.tobytes())


def write(index: Any, metric: str, path: Path) -> None:
    """Write the index to a new file ``path`` in FAISS's own format, in chunks straight from its memory.

    No bytes copy (:func:`serialize` of a 20k x 784 flat index took 0.14 s and a second 63 MB; this
    0.06 s). Through a Python file, not FAISS's own fopen, so that a full disk raises the OSError
    (ENOSPC) that :func:`embedsearch.errors.os_errors` turns into DiskFullError, not a RuntimeError.
    """
    writer = faiss.write_index_binary if is_binary(metric) else faiss.write_index
    with open(path, "xb") as fh:
        writer(index, faiss.PyCallbackIOWriter(fh.write))  # type: ignore[attr-defined]  # not in the stubs


def read(path: Path, metric: str) -> Any:
    """The index of :func:`write`'s file; RuntimeError if it is not one of ``metric``'s."""
    return (faiss.read_index_binary if is_binary(metric) else faiss.read_index)(str(path))


def deserialize(data: np.ndarray, metric: str) -> Any:
    """The index of :func:`serialize`'s bytes (a uint8 array); RuntimeError if they are not one of ``metric``'s."""
    return faiss.deserialize_index_binary(data) if is_binary(metric) else faiss.deserialize_index(data)


def search(
    index: faiss.Index | faiss.IndexBinary, queries: np.ndarray, k: int, metric: str, params: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids), each (Q, k) for prepared ``queries``; id -1 (distance inf) means no result.

    Distances: Euclidean for l2, 1 - cos for cosine, the number of differing bits for hamming.
    """
    if k < 1:
        raise InvalidArgumentError("k must be at least 1")
    faiss.omp_set_num_threads(1 if len(queries) < BATCH_THREADS_FROM else all_threads())
    scores, ids = index.search(queries, k, params=params)
    if is_binary(metric):
        dist = scores.astype(np.float32)  # int32 bit counts
    elif metric == "cosine":
        dist = np.clip(1.0 - scores, 0.0, 2.0)
    else:
        dist = np.sqrt(np.maximum(scores, 0.0))
    dist[ids < 0] = np.inf
    return dist, ids.astype(np.int64, copy=False)
