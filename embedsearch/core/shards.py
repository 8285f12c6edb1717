"""Sharded building of the IVF types: train once, add shards in parallel, merge the inverted lists.

As autofaiss builds large indexes: the trained, empty IVF index is copied to every shard job, each
adds its slice of the vectors with ids that are their global positions (so no two shards share
one), and the driver merges the shards' inverted lists in shard order (``IndexIVF.merge_from``).
That is what one process adding the same vectors in the same order builds: the same lists, codes
and ids (``tests/test_shards.py`` compares the serialised files). The exact re-ranking store of
``ivfpq`` (``IndexRefineFlat``'s flat vectors) and the id map are appended on the driver: copying
vectors costs nothing beside the quantiser's assignment and PQ encoding that the shards do.

Shard jobs run on a :data:`Runner`: threads here by default (FAISS releases the GIL while adding),
or Ray tasks on a cluster (``core.ray_jobs``). HNSW graphs cannot be merged and a flat index has
nothing to parallelise: those types are built in one process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)

#: One shard's job: (the trained empty IVF index, serialised; its vectors (n, d); their positions (n,)).
Job = tuple[bytes, np.ndarray, np.ndarray]
#: Runs every job (in any order, in parallel) and returns the serialised filled shards in job order.
Runner = Callable[[Sequence[Job]], list[bytes]]
SHARDABLE = frozenset({"ivf", "ivfpq"})
_NO_MAP = faiss.DirectMap.NoMap  # type: ignore[attr-defined]  # (the stubs lack SWIG's DirectMap)


def add_shard(job: Job) -> bytes:
    """Add one shard's vectors at their positions to a copy of the trained empty IVF index."""
    empty, x, positions = job
    part = faiss.deserialize_index(np.frombuffer(empty, dtype=np.uint8))
    part.add_with_ids(x, positions)
    return bytes(faiss.serialize_index(part))


def threads(jobs: Sequence[Job]) -> list[bytes]:
    """The local runner: one thread per core."""
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        return list(pool.map(add_shard, jobs))


def _ivf_and_refine(wrapped: Any) -> tuple[Any, Any]:
    """The IVF index inside an IndexIDMap2, and the IndexRefineFlat around it (None for IVF-Flat)."""
    inner = faiss.downcast_index(wrapped.index)
    if isinstance(inner, faiss.IndexRefine):
        return faiss.downcast_index(inner.base_index), inner
    return faiss.extract_index_ivf(inner), None


def add_sharded(wrapped: Any, ids: np.ndarray, x: np.ndarray, shards: int, run: Runner = threads) -> None:
    """Add prepared (n, d) float32 ``x`` with image ``ids`` to a trained IndexIDMap2 over an IVF type,
    in ``shards`` parallel jobs; the index ends as if ``wrapped.add_with_ids(x, ids)`` had run."""
    ivf, refine = _ivf_and_refine(wrapped)
    start, n = int(wrapped.ntotal), len(ids)
    # Only the inverted lists are merged: a direct map (IVF-Flat's, for reconstruct) is rebuilt after.
    direct = ivf.direct_map.type
    ivf.set_direct_map_type(_NO_MAP)
    empty = faiss.clone_index(ivf)
    empty.reset()
    blob = bytes(faiss.serialize_index(empty))
    bounds = np.linspace(0, n, max(1, min(shards, n)) + 1).astype(np.int64)
    positions = np.arange(start, start + n, dtype=np.int64)
    jobs = [(blob, x[a:b], positions[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    log.info("adding %d vectors in %d shards", n, len(jobs))
    for part in run(jobs):
        ivf.merge_from(faiss.deserialize_index(np.frombuffer(part, dtype=np.uint8)), 0)
    if direct != _NO_MAP:
        ivf.set_direct_map_type(direct)
    if refine is not None:
        refine.refine_index.add(x)
        refine.ntotal = refine.refine_index.ntotal
    known = faiss.vector_to_array(wrapped.id_map).astype(np.int64)
    faiss.copy_array_to_vector(np.concatenate([known, ids.astype(np.int64)]), wrapped.id_map)
    wrapped.ntotal = start + n
    wrapped.construct_rev_map()
