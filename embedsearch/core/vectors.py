"""One exact FAISS index per model, kept in step with the metadata store.

The database holds every vector; ``<home>/indexes/<model>.faiss`` is a cache of them that loads in
milliseconds instead of being rebuilt. Beside it, ``<model>.faiss.json`` records the highest index
entry id the file contains. Opening an index applies what the database has gained since (entry ids
only grow) and drops what it has lost, so a run killed at any moment leaves nothing to repair by
hand: the next open catches up. Files are replaced atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from embedsearch.core.store import Store
from embedsearch.errors import VectorIndexError

log = logging.getLogger(__name__)

METRICS = {"l2": faiss.METRIC_L2, "cosine": faiss.METRIC_INNER_PRODUCT}


@dataclass
class Stamp:
    """What a saved index file contains, in terms of the database."""

    last_entry_id: int = 0
    count: int = 0


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def as_matrix(vectors: np.ndarray, dim: int) -> np.ndarray:
    """FAISS wants C-contiguous float32 (N, dim)."""
    out = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dim)
    return out


class VectorIndex:
    """An exact (flat) index whose ids are image ids. Cosine = normalised vectors + inner product."""

    def __init__(self, dim: int, metric: str = "l2") -> None:
        if metric not in METRICS:
            raise VectorIndexError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        self.dim = dim
        self.metric = metric
        flat = faiss.IndexFlat(dim, METRICS[metric])
        self.index = faiss.IndexIDMap2(flat)
        self.stamp = Stamp()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        x = as_matrix(vectors, self.dim)  # (N, dim)
        if self.metric == "cosine":
            x = x.copy()
            faiss.normalize_L2(x)
        return x

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(self._prepare(vectors), np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray | list[int]) -> int:
        if len(ids) == 0:
            return 0
        return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def search(
        self, vectors: np.ndarray, k: int, exclude: set[int] | frozenset[int] = frozenset()
    ) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), each (N, k); id -1 means no result. L2: Euclidean; cosine: 1 - cos.

        Ids in ``exclude`` are never returned (FAISS skips them during the scan).
        """
        x = self._prepare(vectors)  # (N, dim)
        # One query is fastest on one thread; a batch profits from all cores.
        faiss.omp_set_num_threads(1 if len(x) < 16 else os.cpu_count() or 1)
        params = None
        if exclude:
            skip = faiss.IDSelectorBatch(np.fromiter(exclude, dtype=np.int64))
            params = faiss.SearchParameters(sel=faiss.IDSelectorNot(skip))
            params.keep = skip  # the SWIG wrapper does not own the selector: keep it alive
        scores, ids = self.index.search(x, k, params=params)
        dist = np.clip(1.0 - scores, 0.0, 2.0) if self.metric == "cosine" else np.sqrt(np.maximum(scores, 0.0))
        dist[ids < 0] = np.inf
        return dist, ids

    def reconstruct(self, image_id: int) -> np.ndarray:
        return self.index.reconstruct(int(image_id))

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        atomic_write(path, faiss.serialize_index(self.index).tobytes())
        # The stamp goes second: if we die in between, an old stamp only makes the next open
        # re-apply entries it already has, which sync() handles.
        atomic_write(path.with_suffix(".faiss.json"), json.dumps(asdict(self.stamp)).encode())

    @classmethod
    def load(cls, path: Path, dim: int, metric: str) -> VectorIndex:
        out = cls(dim, metric)
        try:
            index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
            stamp = Stamp(**json.loads(path.with_suffix(".faiss.json").read_text()))
        except (RuntimeError, OSError, ValueError, TypeError) as exc:
            log.warning("%s: unreadable (%s); rebuilding it from the database", path, exc)
            return out
        if index.d != dim or not isinstance(index, faiss.IndexIDMap2):
            log.warning("%s: does not match its model; rebuilding it from the database", path)
            return out
        out.index, out.stamp = index, stamp
        return out

    # -- keeping step with the database ------------------------------------------------------------
    def sync(self, store: Store, model_id: int) -> bool:
        """Apply what the database gained or lost since this index was saved. True if it changed."""
        count, last = store.entry_stamp(model_id)
        if (count, last) == (self.stamp.count, self.stamp.last_entry_id) and count == len(self):
            return False
        fresh = store.entries_after(model_id, self.stamp.last_entry_id)
        if fresh:
            ids = np.array([image_id for _, image_id, _ in fresh], dtype=np.int64)
            self.remove(ids)  # re-encoded images come back with a new entry
            self.add(ids, np.frombuffer(b"".join(v for _, _, v in fresh), dtype=np.float32))
        if len(self) != count:
            self._drop_and_fill(store, model_id)
        self.stamp = Stamp(last_entry_id=last, count=count)
        return True

    def _drop_and_fill(self, store: Store, model_id: int) -> None:
        have = set(self.ids().tolist())
        want = set(store.entry_image_ids(model_id))
        self.remove(np.array(sorted(have - want), dtype=np.int64))
        missing = sorted(want - have)
        for i in range(0, len(missing), 5000):
            rows = store.entry_vectors(model_id, missing[i : i + 5000])
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            self.add(ids, np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32))
        log.info("index brought in step with the database: %d removed, %d added", len(have - want), len(missing))
