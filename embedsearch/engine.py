"""The core: one :class:`Engine` over a library home. The CLI and the HTTP service only call it.

A library home holds ``library.db`` (metadata, unless ``--db`` names another database),
``indexes/<model>.faiss`` (one exact FAISS index per model) and ``models/<name>/`` (config.json
and weights). Writers (index, remove, train) hold ``library.lock``; readers never wait.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from embedsearch.core.library import ImagesMixin
from embedsearch.core.models import ModelsMixin
from embedsearch.core.store import Model, Store
from embedsearch.core.vectors import VectorIndex
from embedsearch.data.images import DEFAULT_MAX_PIXELS, decode_file, scan
from embedsearch.encoders.base import Encoder
from embedsearch.errors import DataError, ImageError, InvalidArgumentError, LockedError
from embedsearch.results import LibraryInfo, Neighbour, QueryResult

log = logging.getLogger(__name__)

DEFAULT_HOME = "indexes"
LOCK_TIMEOUT = 600.0


def _dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


class Engine(ModelsMixin, ImagesMixin):
    """An opened library. Cheap to open: models and indexes load on first use."""

    def __init__(
        self, home: str | os.PathLike[str] | None = None, db: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.home = Path(home or os.environ.get("EMBEDSEARCH_HOME") or DEFAULT_HOME).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.db_url = db or os.environ.get("EMBEDSEARCH_DB") or f"sqlite:///{self.home / 'library.db'}"
        self.max_pixels = max_pixels
        self.store = Store(self.db_url)
        self._encoders: dict[str, Encoder] = {}
        self._indexes: dict[str, VectorIndex] = {}
        self._models: dict[str, Model] = {}
        self._writer_lock: Any = None
        self._dirty: set[str] = set()  # indexes changed in memory since their file was written
        self._generated: set[int] | None = None  # ids of generated images, loaded on first search
        # FAISS indexes are not safe to search while another thread adds to them: every in-process
        # change and search of an index holds this lock (each search takes about a millisecond).
        self.index_lock = threading.RLock()

    def close(self) -> None:
        if self._dirty:
            try:
                self.flush()
            except LockedError as exc:  # the file is a cache: the next open catches up anyway
                log.warning("index files not saved: %s", exc)
        self.store.close()

    def flush(self) -> None:
        """Write the index files that single-image changes (uploads, deletions) left behind."""
        with self.writing():
            for name in sorted(self._dirty):
                index = self._indexes.get(name)
                if index is not None:
                    with self.index_lock:
                        index.sync(self.store, self.model(name).id)
                        index.save(self.index_path(name))
            self._dirty.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths and locking --------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        return self.home / "models" / name

    def index_path(self, name: str) -> Path:
        return self.home / "indexes" / f"{name}.faiss"

    @contextmanager
    def writing(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the library's writer lock; say so on the log when another writer makes us wait.

        Re-entrant within a thread (one FileLock object per Engine counts its holds), so an
        operation that must decide and write atomically can call others that lock too.
        """
        from filelock import FileLock, Timeout

        if self._writer_lock is None:
            self._writer_lock = FileLock(str(self.home / "library.lock"))
        lock = self._writer_lock
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.warning("another process is writing to %s; waiting up to %.0f s", self.home, timeout)
            try:
                lock.acquire(timeout=timeout)
            except Timeout:
                raise LockedError(f"{self.home} is still being written by another process; try again later") from None
        try:
            yield
        finally:
            lock.release()

    # -- indexes ------------------------------------------------------------------------------
    def vector_index(self, name: str) -> VectorIndex:
        """The model's FAISS index: loaded from its file and brought in step with the database once.

        Later changes made through this Engine are applied as they happen; those of other
        processes show after :meth:`refresh`.
        """
        index = self._indexes.get(name)
        if index is None:
            model = self.model(name)
            path = self.index_path(name)
            index = (
                VectorIndex.load(path, model.dim, model.metric)
                if path.exists()
                else VectorIndex(model.dim, model.metric)
            )
            index.sync(self.store, model.id)
            self._indexes[name] = index
        return index

    def refresh(self) -> None:
        """Pick up what other processes committed: new models, new or removed vectors.

        Safe beside searching threads: the model cache is swapped in one step and every index is
        synced under ``index_lock``, so a search sees an index before or after, never half-way.
        """
        fresh = {m.name: m for m in self.store.models()}
        generated = self.store.generated_ids()
        with self.index_lock:
            for name, index in list(self._indexes.items()):
                old, new = self._models.get(name), fresh.get(name)
                if new is None or old is None or new.id != old.id:
                    self._forget(name)  # deleted or retrained elsewhere: load afresh when next used
                    continue
                index.sync(self.store, new.id)
            self._models = fresh
            self._generated = generated

    def save_index(self, name: str) -> None:
        index = self._indexes.get(name)
        if index is not None:
            index.save(self.index_path(name))

    # -- operations ---------------------------------------------------------------------------
    def index(self, data: str, model: str, **kwargs: Any) -> Any:
        from embedsearch.core.bulk import bulk_index

        return bulk_index(self, data, model, **kwargs)

    def generate(self, model: str, **kwargs: Any) -> Any:
        """Candidates from a model's decoder; see :func:`embedsearch.core.generate.generate`."""
        from embedsearch.core.generate import generate

        return generate(self, model, **kwargs)

    def check(self, repair: bool = False) -> Any:
        """Verify (and with ``repair``, mend) index, metadata, checkpoints and stored files."""
        from embedsearch.core.check import check

        return check(self, repair)

    def reconstruct(self, paths: list[str], model: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(N, S, S, C) originals at the model's input and their reconstructions, with the paths used."""
        encoder = self.encoder(model)
        if not hasattr(encoder, "reconstruct"):
            raise InvalidArgumentError(f"model {model!r} ({encoder.kind}) has no decoder to reconstruct with")
        arrays, used = [], []
        for path in paths:
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such image file")
            arrays.append(decode_file(path, encoder.spec, self.max_pixels)[1])
            used.append(path)
        originals = np.stack(arrays)
        return originals, encoder.reconstruct(originals), used

    def encode_files(self, paths: list[str], model: str) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
        """Vectors (N, dim) of image files, with the paths used and the failures."""
        encoder = self.encoder(model)
        arrays, used, failed = [], [], []
        for path in paths:
            try:
                arrays.append(decode_file(path, encoder.spec, self.max_pixels)[1])
                used.append(path)
            except ImageError as exc:
                failed.append((path, exc.reason))
        if not arrays:
            return np.zeros((0, encoder.dim), np.float32), used, failed
        return encoder.encode(np.stack(arrays)), used, failed

    def generated_ids(self) -> set[int]:
        if self._generated is None:
            self._generated = self.store.generated_ids()
        return self._generated

    def search_vectors(
        self, vectors: np.ndarray, model: str, k: int = 10, include_generated: bool = False
    ) -> list[list[Neighbour]]:
        """Nearest indexed images of each vector (N, dim), with their metadata.

        Generated images (``generate --add``) are left out unless ``include_generated``.
        """
        if k < 1:
            raise InvalidArgumentError("k must be at least 1")
        exclude = set() if include_generated else self.generated_ids()
        with self.index_lock:
            index = self.vector_index(model)
            dist, ids = index.search(vectors, min(k, max(len(index), 1)), exclude)
        found = self.store.labels_paths(sorted({int(i) for i in ids.ravel() if i >= 0}))
        out = []
        for drow, irow in zip(dist, ids, strict=False):
            hits = [(float(d), int(i)) for d, i in zip(drow, irow, strict=False) if i >= 0 and int(i) in found]
            out.append([Neighbour(r, i, *found[i], d) for r, (d, i) in enumerate(hits, 1)])
        return out

    def query(
        self, images: list[str], model: str, k: int = 10, batch_size: int = 256, include_generated: bool = False
    ) -> Iterator[QueryResult | tuple[str, str]]:
        """Neighbours of each image (folders expand to their images), in batches.

        Yields a QueryResult per good image and a (path, reason) tuple per file that failed.
        """
        files: list[str] = []
        for item in images:
            if not os.path.exists(item):
                raise DataError(f"{item}: no such file or folder")
            found = [f.path for f in scan(item)] if os.path.isdir(item) else [item]
            if os.path.isdir(item) and not found:
                raise DataError(f"{item}: the folder holds no images")
            files.extend(found)
        self.model(model)
        for start in range(0, len(files), batch_size):
            vectors, used, failed = self.encode_files(files[start : start + batch_size], model)
            yield from failed
            for path, hits in zip(used, self.search_vectors(vectors, model, k, include_generated), strict=False):
                yield QueryResult(path, model, hits)

    def remove(self, paths: list[str]) -> int:
        """Forget the images at these paths (a folder: everything under it). Files stay on disk."""
        with self.writing():
            ids: list[int] = []
            for path in paths:
                matches = self.store.images_under(str(Path(path).resolve()))
                if not matches:
                    raise DataError(f"{path}: no indexed image at or under this path")
                ids.extend(m.id for m in matches)
            removed = self.store.delete_images(ids)
            for model in self.store.models():
                index = self.vector_index(model.name)
                index.sync(self.store, model.id)  # drops the deleted vectors
                index.save(self.index_path(model.name))
        return removed

    def info(self) -> LibraryInfo:
        disk = {
            "database": _dir_size(self.home / "library.db") + _dir_size(self.home / "library.db-wal"),
            "indexes": _dir_size(self.home / "indexes"),
            "models": _dir_size(self.home / "models"),
        }
        return LibraryInfo(
            str(self.home),
            self.db_url if "://" in self.db_url else self.db_url,
            self.store.counts()["images"],
            self.models(),
            disk,
        )
