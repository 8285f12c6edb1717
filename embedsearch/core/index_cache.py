"""The one owner of index state: loading, syncing with the database, locking, saving.

Every change to a model's FAISS index goes through :class:`IndexCache`, inside a
:meth:`IndexCache.writing` block that holds the library's writer lock:

- on entering (outermost), every loaded index is synced with the database, so changes made by
  other processes are in before this one adds its own;
- inside, callers commit to the database first and then apply the same change here
  (:meth:`add`, :meth:`remove`, :meth:`remove_images`), which marks the index as changed;
- on leaving, every changed index is stamped with the database's state and, unless saves are
  deferred (the HTTP service: :meth:`flush` runs every few seconds and on close), written atomically.

So when a command ends, every index file on disk matches the database, and the next command has
nothing to catch up on. A file that is behind anyway (a process was killed) is caught up when it is
loaded and, if no writer holds the lock, saved at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from embedsearch.core.ann import IndexSpec
from embedsearch.core.layout import Layout, WriterLock
from embedsearch.core.schema import Model
from embedsearch.core.store import Store
from embedsearch.core.vectors import Owner, VectorIndex
from embedsearch.errors import EmbedSearchError

log = logging.getLogger(__name__)


class IndexCache:
    """Loaded indexes by model name, the set of changed ones, and the generated image ids."""

    def __init__(self, store: Store, layout: Layout, writer: WriterLock) -> None:
        self.store = store
        self.layout = layout
        self.writer = writer
        # FAISS indexes are not safe to search while another thread adds to them: every in-process
        # change and search of an index holds this lock (each search takes about a millisecond).
        self.lock = threading.RLock()
        self.defer_saves = False
        self._loaded: dict[str, tuple[Owner, VectorIndex]] = {}  # name -> (whose, index)
        self._changed: set[str] = set()  # changed in this writing block, not yet stamped
        self._unsaved: set[str] = set()  # stamped, file not yet written (deferred saves)
        self._generated: set[int] | None = None

    # -- reading ------------------------------------------------------------------------------
    def index(self, model: Model) -> VectorIndex:
        """The model's index: loaded from its file and brought in step with the database once."""
        with self.lock:
            cached = self._loaded.get(model.name)
            if cached is not None and cached[0] == Owner.of(model):  # a model made anew may reuse an id
                return cached[1]
            spec = IndexSpec.from_json(model.index_spec)
            index = VectorIndex.load(self.layout.index_path(model.name), model.dim, model.metric, Owner.of(model), spec)
            caught_up = index.sync(self.store, model.id)
            self._loaded[model.name] = (Owner.of(model), index)
            if caught_up and not self.writer.held:
                self._save_if_free(model.name)
            elif caught_up:
                self._unsaved.add(model.name)  # the writing block that holds the lock saves it
            return index

    def search(
        self,
        model: Model,
        vectors: np.ndarray,
        k: int,
        exclude: set[int] | frozenset[int],
        only: set[int] | frozenset[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), each (N, min(k, size)); see :meth:`VectorIndex.search`."""
        with self.lock:
            index = self.index(model)
            return index.search(vectors, min(k, max(len(index), 1)), exclude, only)

    def size(self, model: Model) -> int:
        with self.lock:
            return len(self.index(model))

    def generated(self) -> set[int]:
        """Ids of generated images (``generate --add``), left out of searches unless asked."""
        if self._generated is None:
            self._generated = self.store.generated_ids()
        return self._generated

    # -- writing ------------------------------------------------------------------------------
    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writer lock; sync on entry, stamp and save what changed on exit (outermost).

        With deferred saves (the service) the per-change work is only the in-memory change: the
        sync with other processes' writes and the stamp happen on :meth:`refresh` and :meth:`flush`.
        """
        self.writer.acquire()
        outermost = self.writer.depth == 1
        try:
            if outermost and not self.defer_saves:
                self._sync_loaded()
            yield
        except BaseException:
            if outermost:
                self._settle_after_error()
            raise
        else:
            if outermost:
                self._settle()
        finally:
            self.writer.release()

    def add(self, model: Model, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Apply committed entries: ``ids`` (N,) replace whatever the index held for them."""
        self._require_writer()
        with self.lock:
            index = self.index(model)
            index.remove(ids)
            index.add(ids, vectors)
            self._changed.add(model.name)

    def remove(self, model: Model, ids: np.ndarray) -> None:
        self._require_writer()
        with self.lock:
            self.index(model).remove(ids)
            self._changed.add(model.name)

    def remove_images(self, ids: list[int]) -> None:
        """Apply deleted images: their vectors leave every model's index (loaded or not)."""
        self._require_writer()
        if not ids:
            return
        array = np.array(ids, dtype=np.int64)
        with self.lock:
            for model in self.store.models():
                self.index(model).remove(array)
                self._changed.add(model.name)
            if self._generated is not None:
                self._generated.difference_update(ids)

    def mark_generated(self, ids: list[int]) -> None:
        self.generated().update(ids)

    def rebuild(self, model: Model) -> int:
        """Replace the model's index by one built from the database alone; its size."""
        self._require_writer()
        fresh = VectorIndex.for_model(model)
        fresh.sync(self.store, model.id)
        with self.lock:
            self._loaded[model.name] = (Owner.of(model), fresh)
            self._changed.add(model.name)
        return len(fresh)

    def install(self, model: Model, index: VectorIndex) -> None:
        """Put an index built from the database under the writer lock (reindex) in the model's place."""
        self._require_writer()
        with self.lock:
            self._loaded[model.name] = (Owner.of(model), index)
            self._changed.add(model.name)

    def drop(self, name: str) -> None:
        """Forget a model's index and delete its files (the model was deleted or made anew)."""
        self._require_writer()
        with self.lock:
            self._loaded.pop(name, None)
            self._changed.discard(name)
            self._unsaved.discard(name)
        for path in self.layout.index_files(name):
            path.unlink(missing_ok=True)

    def flush(self, wait: bool = True) -> None:
        """Write the index files whose saving was deferred; ``wait=False``: only if no one is writing."""
        if not self.pending():
            return
        if wait:
            self.writer.acquire()
        elif not self.writer.try_acquire():
            return  # a writer holds the lock; the next flush saves
        try:
            if self.writer.depth == 1:
                self._sync_loaded()
                self._settle(save=True)
        finally:
            self.writer.release()

    def refresh(self, models: dict[str, Model]) -> None:
        """Pick up what other processes committed. ``models``: the current rows by name.

        Safe beside searching threads: each index is synced under ``lock``, so a search sees it
        before or after, never half-way.
        """
        generated = self.store.generated_ids()
        with self.lock:
            for name, (owner, index) in list(self._loaded.items()):
                row = models.get(name)
                retyped = row is not None and IndexSpec.from_json(row.index_spec).build_key() != index.spec.build_key()
                if row is None or Owner.of(row) != owner or retyped:
                    self._loaded.pop(name)  # deleted or made anew elsewhere: load afresh when next used
                    self._unsaved.discard(name)
                    continue
                index.sync(self.store, owner.model_id)  # the writer that made these changes saved its file
            self._generated = generated

    def pending(self) -> bool:
        """True if some index differs from its file (saves deferred, or a writer is mid-way)."""
        return bool(self._changed or self._unsaved)

    # -- internals ----------------------------------------------------------------------------
    def _require_writer(self) -> None:
        if not self.writer.held:
            raise RuntimeError("index changes need IndexCache.writing(): the writer lock is not held")

    def _sync_loaded(self) -> None:
        with self.lock:
            for name, (owner, index) in self._loaded.items():
                if index.sync(self.store, owner.model_id):
                    self._unsaved.add(name)  # other writers' changes; our file may predate them

    def _settle_after_error(self) -> None:
        """Save what the failed work committed, if the disk lets us: an error here must not hide the first."""
        try:
            self._settle()
        except (EmbedSearchError, OSError) as exc:
            # The files are a cache: the next open rebuilds them from the database, so they are not
            # retried (a retry on close would only repeat it). Info, not a warning: the error that
            # ended the work is the one line the user needs.
            log.info("index files not saved: %s", exc)
            with self.lock:
                self._unsaved.clear()

    def _settle(self, save: bool = False) -> None:
        with self.lock:
            if self.defer_saves and not save:
                # Not stamped: the sync in flush() or refresh() re-reads what changed since the
                # last stamp (ours and other processes'), so no per-change query is needed here.
                self._unsaved |= self._changed
                self._changed.clear()
                return
            for name in self._changed:
                owner, index = self._loaded[name]
                if index.needs_rebuild():
                    index = self._compacted(name, owner, index)
                index.restamp(self.store, owner.model_id)
            self._unsaved |= self._changed
            self._changed.clear()
            self._save_unsaved()

    def _compacted(self, name: str, owner: Owner, index: VectorIndex) -> VectorIndex:
        """An approximate index rebuilt from the database: too many of its vectors were masked."""
        log.info("index of %r: %d of its vectors are removed ones; rebuilding it", name, index.masked)
        fresh = VectorIndex(index.dim, index.metric, owner, index.spec)
        fresh.sync(self.store, owner.model_id)
        self._loaded[name] = (owner, fresh)
        return fresh

    def _save_unsaved(self) -> None:
        for name in sorted(self._unsaved):
            if name in self._loaded:
                self._loaded[name][1].save(self.layout.index_path(name))
        self._unsaved.clear()

    def _save_if_free(self, name: str) -> None:
        """Save an index that loading caught up, unless another process is writing (it saves then)."""
        if not self.writer.try_acquire():
            return
        try:
            with self.lock:
                owner, index = self._loaded[name]
                index.sync(self.store, owner.model_id)  # under the lock: exactly the database now
                index.save(self.layout.index_path(name))
        finally:
            self.writer.release()
