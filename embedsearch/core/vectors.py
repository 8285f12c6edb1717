"""One exact FAISS index of a model, kept in step with the metadata store.

The database holds every vector; ``<home>/indexes/<model>.faiss`` is a cache of them that loads in
milliseconds instead of being rebuilt. Beside it, ``<model>.faiss.json`` records which entries the
file contains. :meth:`VectorIndex.sync` applies what the database gained since (entry ids only
grow) and drops what it lost, so a run killed at any moment leaves nothing to repair by hand.
Who loads, syncs and saves these is :class:`embedsearch.core.index_cache.IndexCache`'s business.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from embedsearch.core import knn
from embedsearch.core.schema import Model
from embedsearch.core.store import Store
from embedsearch.errors import VectorIndexError, os_errors
from embedsearch.files import atomic_write

log = logging.getLogger(__name__)
_FILL_BATCH = 5000


@dataclass(frozen=True)
class Owner:
    """The model an index file belongs to: a file of another model (or of an earlier model of the same
    name) must never be searched as this one's, even when its dimension fits."""

    model_id: int
    name: str
    dim: int
    metric: str
    checkpoint_sha256: str | None

    @classmethod
    def of(cls, model: Model) -> Owner:
        return cls(model.id, model.name, model.dim, model.metric, model.checkpoint_sha256)


@dataclass
class Stamp:
    """What an index contains, in terms of the database: (count, highest entry id) of its entries,
    and whose entries they are."""

    last_entry_id: int = 0
    count: int = 0
    owner: dict[str, Any] | None = None


class VectorIndex:
    """An exact (flat) index whose ids are image ids. Cosine = normalised vectors + inner product;
    hamming = packed bits in a FAISS binary index (``dim`` bits, ``dim // 8`` bytes per vector)."""

    def __init__(self, dim: int, metric: str = "l2", owner: Owner | None = None) -> None:
        if metric not in knn.METRICS:
            raise VectorIndexError(f"unknown metric {metric!r}; choose one of {', '.join(knn.METRICS)}")
        self.dim = dim
        self.metric = metric
        self.owner = owner
        self.index = knn.id_index(dim, metric)  # IndexIDMap2, or IndexBinaryIDMap2 for hamming
        self.stamp = Stamp(owner=asdict(owner) if owner else None)
        #: Why the file this was loaded from could not be used (it is then rebuilt from the database).
        self.problem: str | None = None

    @classmethod
    def for_model(cls, model: Model) -> VectorIndex:
        return cls(model.dim, model.metric, Owner.of(model))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        """(N, dim) as this index stores them: float32, unit length for cosine; (N, dim // 8) uint8 for hamming."""
        return knn.prepare(vectors, self.metric, self.dim)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def vectors(self) -> dict[int, np.ndarray]:
        """image id -> the vector the index holds (normalised for cosine)."""
        ids = self.ids()
        if not len(ids):
            return {}
        stored = self.index.index.reconstruct_n(0, len(ids))  # (N, dim), in id-map order
        return dict(zip(ids.tolist(), stored, strict=True))

    def reconstruct(self, image_id: int) -> np.ndarray:
        """(dim,) the vector the index holds for an image."""
        return np.asarray(self.index.reconstruct(int(image_id)))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(self.prepare(vectors), np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray | list[int]) -> int:
        if len(ids) == 0:
            return 0
        # faiss's stubs only list remove_ids(IDSelector); its wrapper also takes an int64 array of ids.
        return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))  # type: ignore[arg-type]

    def search(
        self, vectors: np.ndarray, k: int, exclude: set[int] | frozenset[int] = frozenset()
    ) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), each (N, k); id -1 means no result. L2: Euclidean; cosine: 1 - cos.

        Ids in ``exclude`` are never returned (FAISS skips them during the scan).
        """
        params = None
        if exclude:
            skip = faiss.IDSelectorBatch(np.fromiter(exclude, dtype=np.int64))
            # faiss's stubs omit SWIG's keyword constructor and the ad-hoc attribute we hang on it.
            params = faiss.SearchParameters(sel=faiss.IDSelectorNot(skip))  # type: ignore[call-arg]
            params.keep = skip  # type: ignore[attr-defined]  # the wrapper does not own the selector: keep it alive
        return knn.search(self.index, self.prepare(vectors), k, self.metric, params)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        with os_errors(f"cannot write the index file {path}"):
            atomic_write(path, knn.serialize(self.index, self.metric))
            # The stamp goes second: if we die in between, an old stamp only makes the next open
            # re-apply entries it already has, which sync() handles.
            atomic_write(path.with_suffix(".faiss.json"), json.dumps(asdict(self.stamp)).encode())

    @classmethod
    def load(cls, path: Path, dim: int, metric: str, owner: Owner | None = None) -> VectorIndex:
        """The index saved at ``path``; an empty one (to be filled by sync) if it is missing or unusable.

        With ``owner``, a file stamped for another model (or for none) is unusable too: its
        :attr:`problem` says why, and the caller rebuilds it from the database.
        """
        out = cls(dim, metric, owner)
        if not path.exists():
            return out
        try:
            index = knn.deserialize(np.fromfile(path, dtype=np.uint8), metric)
            stamp = Stamp(**json.loads(path.with_suffix(".faiss.json").read_text()))
        except (RuntimeError, OSError, ValueError, TypeError) as exc:
            out.problem = "a folder, not an index file" if path.is_dir() else f"unreadable: {exc}"
        else:
            out.problem = _mismatch(index, stamp, dim, metric, owner)
            if out.problem is None:
                out.index, out.stamp = index, stamp
        if out.problem:
            log.warning("%s: %s; rebuilding it from the database", path.name, out.problem)
        return out

    # -- keeping step with the database ------------------------------------------------------------
    def in_step(self, store: Store, model_id: int) -> bool:
        count, last = store.entry_stamp(model_id)
        return (count, last) == (self.stamp.count, self.stamp.last_entry_id) and count == len(self)

    def sync(self, store: Store, model_id: int) -> bool:
        """Apply what the database gained or lost since this index was stamped. True if it changed."""
        count, last = store.entry_stamp(model_id)
        if (count, last) == (self.stamp.count, self.stamp.last_entry_id) and count == len(self):
            return False
        fresh = store.entries_after(model_id, self.stamp.last_entry_id)
        if fresh:
            ids = np.array([image_id for _, image_id, _ in fresh], dtype=np.int64)
            self.remove(ids)  # re-encoded images come back with a new entry
            self.add(ids, knn.from_bytes(b"".join(v for _, _, v in fresh), self.metric, self.dim))
        if len(self) != count:
            self._drop_and_fill(store, model_id)
        self.stamp = Stamp(last_entry_id=last, count=count, owner=self.stamp.owner)
        return True

    def restamp(self, store: Store, model_id: int) -> None:
        """Record that the index holds exactly the database's entries now.

        Only for a caller that applied every change itself under the writer lock, after a sync:
        it saves re-reading the vectors it just wrote. A count that disagrees falls back to sync.
        """
        count, last = store.entry_stamp(model_id)
        if count != len(self):
            self.sync(store, model_id)
            return
        self.stamp = Stamp(last_entry_id=last, count=count, owner=self.stamp.owner)

    def _drop_and_fill(self, store: Store, model_id: int) -> None:
        have = set(self.ids().tolist())
        want = set(store.entry_image_ids(model_id))
        self.remove(np.array(sorted(have - want), dtype=np.int64))
        missing = sorted(want - have)
        for i in range(0, len(missing), _FILL_BATCH):
            rows = store.entry_vectors(model_id, missing[i : i + _FILL_BATCH])
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            self.add(ids, knn.from_bytes(b"".join(r[1] for r in rows), self.metric, self.dim))
        log.info("index brought in step with the database: %d removed, %d added", len(have - want), len(missing))


def _mismatch(index: Any, stamp: Stamp, dim: int, metric: str, owner: Owner | None) -> str | None:
    """Why a loaded file cannot serve as the index of ``owner``, or None."""
    if index.d != dim or not knn.is_id_index(index, metric):
        return "does not match its model's dimension or kind"
    if owner is None or stamp.owner == asdict(owner):
        return None
    if not stamp.owner:
        return "has no owner stamp (saved by an older version)"
    theirs = stamp.owner
    return (
        f"belongs to model {theirs.get('name')!r} (id {theirs.get('model_id')}), "
        f"not to {owner.name!r} (id {owner.model_id})"
    )
