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

from embedsearch.core import ann, knn
from embedsearch.core import shards as sharding
from embedsearch.core.ann import IndexSpec
from embedsearch.core.schema import Model
from embedsearch.core.store import Store
from embedsearch.errors import VectorIndexError, os_errors
from embedsearch.files import atomic_path, atomic_write

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
    #: The index's type, parameters and measured recall (:class:`embedsearch.core.ann.IndexSpec`).
    index: dict[str, Any] | None = None


class VectorIndex:
    """A model's index whose ids are image ids: exact (flat) or approximate (:mod:`ann`'s types).
    Cosine = normalised vectors + inner product; hamming = packed bits in a FAISS binary index
    (``dim`` bits, ``dim // 8`` bytes per vector).

    Approximate indexes are trained on their first batch (a whole rebuild) and never remove: a
    removed vector's id becomes -1 in the id map (the mask, saved inside the file), and searches skip
    id -1. Past :data:`ann.MASK_REBUILD_FRACTION` masked, :meth:`needs_rebuild` says so.
    """

    def __init__(self, dim: int, metric: str = "l2", owner: Owner | None = None, spec: IndexSpec | None = None) -> None:
        if metric not in knn.METRICS:
            raise VectorIndexError(f"unknown metric {metric!r}; choose one of {', '.join(knn.METRICS)}")
        self.dim = dim
        self.metric = metric
        self.owner = owner
        self.spec = spec or IndexSpec()
        # IndexIDMap2 (over a flat or factory-made index), or IndexBinaryIDMap2 for hamming.
        self.index = ann.new_index(self.spec, dim, metric)
        self.stamp = Stamp(owner=asdict(owner) if owner else None, index=self.spec.to_json())
        #: Why the file this was loaded from could not be used (it is then rebuilt from the database).
        self.problem: str | None = None
        self._masked = 0
        #: Counts adds and removes: what is cached from the entries (their novelties) is stale once it moves.
        self.version = 0

    @classmethod
    def for_model(cls, model: Model) -> VectorIndex:
        return cls(model.dim, model.metric, Owner.of(model), IndexSpec.from_json(model.index_spec))

    def __len__(self) -> int:
        return int(self.index.ntotal) - self._masked

    @property
    def masked(self) -> int:
        """Removed vectors still in an approximate index (masked: never returned)."""
        return self._masked

    def needs_rebuild(self) -> bool:
        return self.spec.approximate and self._masked > ann.MASK_REBUILD_FRACTION * max(int(self.index.ntotal), 1)

    def set_spec(self, spec: IndexSpec) -> None:
        """Adopt a spec whose build matches this index (new search parameters or measured recall)."""
        self.spec = spec
        self.stamp.index = spec.to_json()

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        """(N, dim) as this index stores them: float32, unit length for cosine; (N, dim // 8) uint8 for hamming."""
        return knn.prepare(vectors, self.metric, self.dim)

    def ids(self) -> np.ndarray:
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        return ids[ids >= 0] if self._masked else ids

    def vectors(self) -> dict[int, np.ndarray]:
        """image id -> the vector the index holds (normalised for cosine)."""
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        if not len(ids):
            return {}
        stored = self.index.index.reconstruct_n(0, len(ids))  # (N, dim), in id-map order
        return {i: v for i, v in zip(ids.tolist(), stored, strict=True) if i >= 0}

    def reconstruct(self, image_id: int) -> np.ndarray:
        """(dim,) the vector the index holds for an image."""
        return np.asarray(self.index.reconstruct(int(image_id)))

    def add(
        self, ids: np.ndarray, vectors: np.ndarray, seed: int = 0, shards: int = 1, run: sharding.Runner | None = None
    ) -> None:
        """Add vectors; an untrained approximate index is first trained on a seeded sample of them.

        ``shards`` > 1 adds them to an IVF type in that many parallel jobs on ``run`` (threads by
        default; see :mod:`shards`): the same index as one add.
        """
        if not len(ids):
            return
        self.version += 1
        x = self.prepare(vectors)
        if not self.index.is_trained:
            self.index = ann.train(self.spec, self.dim, self.metric, x, seed)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if shards > 1 and self.spec.type in sharding.SHARDABLE:
            sharding.add_sharded(self.index, ids, x, shards, run or sharding.threads)
        else:
            self.index.add_with_ids(x, ids)

    def remove(self, ids: np.ndarray | list[int]) -> int:
        if len(ids) == 0:
            return 0
        self.version += 1
        if self.spec.approximate:
            return self._mask(np.asarray(ids, dtype=np.int64))
        # faiss's stubs only list remove_ids(IDSelector); its wrapper also takes an int64 array of ids.
        return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def _mask(self, ids: np.ndarray) -> int:
        """HNSW (and the IVF types behind an id map) cannot remove: the ids become -1 in the id map."""
        id_map = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        hit = np.isin(id_map, ids) & (id_map >= 0)
        count = int(hit.sum())
        if count:
            id_map[hit] = -1
            faiss.copy_array_to_vector(id_map, self.index.id_map)
            self.index.construct_rev_map()  # reconstruct() must not find a removed id
            self._masked += count
        return count

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        exclude: set[int] | frozenset[int] = frozenset(),
        only: set[int] | frozenset[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), each (N, k); id -1 means no result. L2: Euclidean; cosine: 1 - cos.

        Ids in ``exclude`` are never returned, and with ``only`` no id outside it (FAISS skips them
        during the scan, so a filter costs no over-fetching).
        """
        sel: Any = None
        skip_ids = set(exclude) | ({-1} if self._masked else set())  # -1: masked (removed) vectors
        if only is not None:
            keep = np.fromiter(set(only) - skip_ids, dtype=np.int64)  # masked vectors are never in it
            if not keep.size:
                return np.full((len(vectors), k), np.inf, np.float32), np.full((len(vectors), k), -1, np.int64)
            sel = faiss.IDSelectorBatch(keep)
        elif skip_ids:
            skip = faiss.IDSelectorBatch(np.fromiter(skip_ids, dtype=np.int64))
            sel = faiss.IDSelectorNot(skip)
            sel.keep = skip  # the wrapper does not own the selector: keep it alive
        params = ann.search_params(self.index, self.spec, sel)
        return knn.search(self.index, self.prepare(vectors), k, self.metric, params)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        with os_errors(f"cannot write the index file {path}"):
            atomic_path(path, lambda tmp: knn.write(self.index, self.metric, tmp))
            # The stamp goes second: if we die in between, an old stamp only makes the next open
            # re-apply entries it already has, which sync() handles.
            atomic_write(path.with_suffix(".faiss.json"), json.dumps(asdict(self.stamp)).encode())

    @classmethod
    def load(
        cls, path: Path, dim: int, metric: str, owner: Owner | None = None, spec: IndexSpec | None = None
    ) -> VectorIndex:
        """The index saved at ``path``; an empty one (to be filled by sync) if it is missing or unusable.

        With ``owner``, a file stamped for another model (or for none) is unusable too: its
        :attr:`problem` says why, and the caller rebuilds it from the database. With ``spec`` (the
        model's recorded index type), so is a file of another type; an empty index of ``spec``'s
        type is trained again, on a seeded sample, by the sync that fills it.
        """
        out = cls(dim, metric, owner, spec)
        if not path.exists():
            return out
        try:
            index = knn.read(path, metric)
            stamp = Stamp(**json.loads(path.with_suffix(".faiss.json").read_text()))
        except (RuntimeError, OSError, ValueError, TypeError) as exc:
            out.problem = "a folder, not an index file" if path.is_dir() else f"unreadable: {exc}"
        else:
            out.problem = _mismatch(index, stamp, dim, metric, owner) or _other_type(stamp, spec)
            if out.problem is None:
                out._adopt(index, stamp, spec)
        if out.problem:
            log.warning("%s: %s; rebuilding it from the database", path.name, out.problem)
        return out

    def _adopt(self, index: Any, stamp: Stamp, spec: IndexSpec | None) -> None:
        self.index, self.stamp = index, stamp
        self.spec = spec or IndexSpec.from_json(stamp.index)  # the model's own search parameters win
        self.stamp.index = self.spec.to_json()
        if self.spec.approximate:
            ann.after_training(index, self.spec)
            self._masked = int((faiss.vector_to_array(index.id_map) < 0).sum())

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
            self.remove(np.array([image_id for _, image_id, _ in fresh], dtype=np.int64))  # re-encoded: a new entry
            self.add(*self._usable([(image_id, v) for _, image_id, v in fresh]))
        if len(self) != count:
            self._drop_and_fill(store, model_id)
        self.stamp = Stamp(last_entry_id=last, count=count, owner=self.stamp.owner, index=self.spec.to_json())
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
        self.stamp = Stamp(last_entry_id=last, count=count, owner=self.stamp.owner, index=self.spec.to_json())

    def _usable(self, rows: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of stored (image id, vector) rows, leaving out (with a warning) any whose
        vector has not the model's size: a damaged database must not stop every open of the library."""
        width = knn.code_bytes(self.dim, self.metric)
        good = [(i, v) for i, v in rows if len(v) == width]
        if len(good) < len(rows):
            bad = sorted(i for i, v in rows if len(v) != width)
            log.warning(
                "%d stored vectors have the wrong size and are left out of the index (images %s); "
                "run 'embedsearch check --repair'",
                len(bad),
                ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else ""),
            )
        ids = np.array([i for i, _ in good], dtype=np.int64)
        return ids, knn.from_bytes(b"".join(v for _, v in good), self.metric, self.dim)

    def _drop_and_fill(self, store: Store, model_id: int) -> None:
        have = set(self.ids().tolist())
        want = set(store.entry_image_ids(model_id))
        self.remove(np.array(sorted(have - want), dtype=np.int64))
        missing = sorted(want - have)
        for i in range(0, len(missing), _FILL_BATCH):
            self.add(*self._usable(store.entry_vectors(model_id, missing[i : i + _FILL_BATCH])))
        log.info("index brought in step with the database: %d removed, %d added", len(have - want), len(missing))


def _other_type(stamp: Stamp, spec: IndexSpec | None) -> str | None:
    theirs = IndexSpec.from_json(stamp.index)
    if spec is None or theirs.build_key() == spec.build_key():
        return None
    return f"is a {theirs.type} index {theirs.params}, the model's is {spec.type} {spec.params}"


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
