"""``reindex``: rebuild a model's index from its stored vectors as a chosen (or ``auto``) type.

Under the writer lock: read every stored vector, choose the type (:func:`ann.choose`), hold out a
seeded sample as queries, build and train the index on the rest, tune its search parameter until
10-recall@10 against an exact search of the same vectors reaches the target, add the held-out
vectors, record the spec in the database (so that a rebuild from it has the same type) and put the
index in the cache, which stamps and saves it atomically when the writing block ends.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from embedsearch.core import ann, knn
from embedsearch.core import shards as sharding
from embedsearch.core.ann import IndexSpec
from embedsearch.core.index_cache import IndexCache
from embedsearch.core.models import ModelRegistry
from embedsearch.core.schema import Model
from embedsearch.core.store import Store
from embedsearch.core.vectors import Owner, Stamp, VectorIndex
from embedsearch.errors import InvalidArgumentError
from embedsearch.results import ReindexResult

log = logging.getLogger(__name__)
K = 10
MAX_QUERIES = 1000


@dataclass(frozen=True)
class Sharding:
    """How the bulk of an IVF index is added: in ``shards`` jobs on ``run`` (None: local threads)."""

    shards: int = 1
    run: sharding.Runner | None = None


class Reindexer:
    def __init__(self, store: Store, cache: IndexCache, registry: ModelRegistry) -> None:
        self.store = store
        self.cache = cache
        self.registry = registry

    def run(
        self,
        name: str,
        index: str = "auto",
        memory: str | int | None = None,
        target_recall: float = 0.95,
        seed: int = 0,
        shards: int = 1,
        run: sharding.Runner | None = None,
    ) -> ReindexResult:
        started = time.perf_counter()
        budget = ann.parse_memory(memory)
        if not 0 < target_recall <= 1:
            raise InvalidArgumentError(f"target recall must be in (0, 1], not {target_recall}")
        if shards < 1:
            raise InvalidArgumentError(f"shards must be at least 1, not {shards}")
        model = self.registry.model(name)
        ann.check_type(index, model.metric)
        with self.cache.writing():
            self.registry.forget(name)
            model = self.registry.model(name)
            ids, vectors = self._stored(model)
            n = len(ids)
            budget_used = budget if budget is not None else ann.default_memory()
            kind = index
            if index == "auto":
                kind = "flat" if knn.is_binary(model.metric) else ann.choose(n, model.dim, budget_used)
            spec = IndexSpec(kind, ann.default_params(kind, n, model.dim))
            if shards > 1 and kind not in sharding.SHARDABLE:
                log.warning("model %r: a %s index is built in one process (only ivf and ivfpq shard)", name, kind)
            sharded = Sharding(shards if kind in sharding.SHARDABLE else 1, run)
            built, queries = self._build(model, spec, ids, vectors, target_recall, seed, sharded)
            self.store.set_index_spec(model.id, built.spec.to_json() if built.spec.approximate else None)
            self.registry.forget(name)
            model = self.registry.model(name)
            self.cache.install(model, built)
        result = ReindexResult(
            model=name,
            type=built.spec.type,
            params=dict(built.spec.params),
            recall=built.spec.recall,
            vectors=len(built),
            chosen_by="auto" if index == "auto" else "user",
            memory_budget=budget_used,
            estimated_bytes=ann.estimate_bytes(kind, n, model.dim, built.spec.params),
            queries=queries,
            target_recall=target_recall,
            seconds=round(time.perf_counter() - started, 3),
            shards=sharded.shards,
        )
        if budget_used is not None and result.estimated_bytes > budget_used:
            log.warning(
                "model %r: its %s index needs about %.1f GB, more than the budget of %.1f GB",
                name,
                kind,
                result.estimated_bytes / 1e9,
                budget_used / 1e9,
            )
        if result.recall is not None and result.recall < target_recall:
            log.warning(
                "model %r: %s reached recall %.3f, below the target %.2f", name, kind, result.recall, target_recall
            )
        return result

    def _stored(self, model: Model) -> tuple[np.ndarray, np.ndarray]:
        rows = self.store.entries_after(model.id, 0)
        ids = np.array([image_id for _, image_id, _ in rows], dtype=np.int64)
        vectors = knn.from_bytes(b"".join(v for _, _, v in rows), model.metric, model.dim)
        return ids, vectors

    def _build(
        self,
        model: Model,
        spec: IndexSpec,
        ids: np.ndarray,
        vectors: np.ndarray,
        target: float,
        seed: int,
        sharded: Sharding,
    ) -> tuple[VectorIndex, int]:
        """The index of every stored vector, tuned on held-out ones; and how many queries measured it."""
        out = VectorIndex(model.dim, model.metric, Owner.of(model), spec)
        n = len(ids)
        if not spec.approximate or n < 2:
            out.add(ids, vectors)
            out.set_spec(IndexSpec(spec.type, spec.params, 1.0 if not spec.approximate else None))
            return self._stamped(out, model), 0
        q = min(MAX_QUERIES, max(1, n // 10))
        held = np.zeros(n, dtype=bool)
        held[np.random.default_rng(seed).choice(n, size=q, replace=False)] = True
        spec = IndexSpec(spec.type, ann.fitted(spec, n - q))  # record what is built: a small library gets less
        out = VectorIndex(model.dim, model.metric, Owner.of(model), spec)
        out.add(ids[~held], vectors[~held], seed=seed, shards=sharded.shards, run=sharded.run)
        exact = VectorIndex(model.dim, model.metric)
        exact.add(ids[~held], vectors[~held])
        k = min(K, n - q)
        _, truth = exact.search(vectors[held], k)

        def measure(trial: IndexSpec) -> float:
            out.set_spec(trial)
            return ann.recall_at(out.search(vectors[held], k)[1], truth)

        out.set_spec(ann.tune(spec, measure, target))
        out.add(ids[held], vectors[held])  # the held-out vectors go into the trained index like any add
        return self._stamped(out, model), q

    def _stamped(self, index: VectorIndex, model: Model) -> VectorIndex:
        count, last = self.store.entry_stamp(model.id)  # under the writer lock: exactly what we read
        index.stamp = Stamp(last_entry_id=last, count=count, owner=index.stamp.owner, index=index.spec.to_json())
        return index
