"""The front of the library: :class:`Engine` builds the core services and forwards to them.

The CLI, the HTTP service, the demo and ``compare`` only call Engine's public methods. Each
service receives its collaborators here (composition); none of them imports this module.

    store ── layout, writer lock
      └─ IndexCache (the one owner of index state)
           └─ ModelRegistry ── Search ── ImageLibrary ── BulkIndexer, Generator, Checker, Thumbnails
                └─ Explainer (decodes stored codes: results explained)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embedsearch.core import ray_bulk
from embedsearch.core.browse import Browser, ImagePage, LabelCount, VectorMap
from embedsearch.core.bulk import BulkIndexer
from embedsearch.core.check import Checker
from embedsearch.core.database import writer_lock_for
from embedsearch.core.dedup import DuplicateFinder, DuplicateReport
from embedsearch.core.explain import Explainer, Explanation
from embedsearch.core.generate import GenerateRequest, Generation, Generator
from embedsearch.core.index_cache import IndexCache
from embedsearch.core.layout import THUMBS, Layout, WriterLock
from embedsearch.core.library import ImageLibrary
from embedsearch.core.models import ModelRegistry
from embedsearch.core.ray_bulk import RayOptions
from embedsearch.core.reindex import Reindexer
from embedsearch.core.schema import Model
from embedsearch.core.search import Search
from embedsearch.core.store import Store
from embedsearch.core.thumbs import DEFAULT_SIZE, Thumbnails
from embedsearch.core.vectors import VectorIndex
from embedsearch.data.images import DEFAULT_MAX_PIXELS, InputSpec
from embedsearch.encoders.base import Encoder
from embedsearch.errors import DiskFullError, LockedError, ReadOnlyError, from_os_error
from embedsearch.files import disk_size
from embedsearch.results import (
    Added,
    CheckReport,
    ImageRecord,
    IndexReport,
    LibraryInfo,
    ModelInfo,
    Neighbour,
    QueryResult,
    ReindexResult,
    Thumbnail,
)

log = logging.getLogger(__name__)

DEFAULT_HOME = "indexes"


class Engine:
    """An opened library. Cheap to open: models and indexes load on first use.

    Opening creates nothing: reads of a library that does not exist raise :class:`NoLibraryError`,
    and only the writes that start a library (``index``, making a model, or ``create=True``) create
    its home folder and database. A library this user cannot write is opened read-only: reads work,
    writes raise :class:`ReadOnlyError`.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        db: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        create: bool = False,
    ) -> None:
        self.home = Path(home or os.environ.get("EMBEDSEARCH_HOME") or DEFAULT_HOME).resolve()
        self.db_url = db or os.environ.get("EMBEDSEARCH_DB") or f"sqlite:///{self.home / 'library.db'}"
        self.max_pixels = max_pixels
        self.store = Store(self.db_url, create=False)
        self.layout = Layout(self.home)
        # PostgreSQL: the database's advisory lock, so that writers on several machines exclude each other.
        writer = WriterLock(self.home / "library.lock", inner=writer_lock_for(self.db_url))
        self.cache = IndexCache(self.store, self.layout, writer)
        self.registry = ModelRegistry(self.store, self.layout, self.cache, max_pixels)
        self.search = Search(self.store, self.cache, self.registry, max_pixels)
        self.library = ImageLibrary(self.store, self.layout, self.cache, self.registry, max_pixels)
        self.bulk = BulkIndexer(self.store, self.cache, self.registry, max_pixels)
        self.generator = Generator(self.registry, self.library, self.search, max_pixels)
        self.checker = Checker(self.store, self.layout, self.cache, self.registry, max_pixels)
        self.duplicate_finder = DuplicateFinder(self.store, self.cache, self.registry)
        self.reindexer = Reindexer(self.store, self.cache, self.registry)
        self.thumbs = Thumbnails(self.library, self.layout, max_pixels)
        self.browser = Browser(self.store, self.registry)
        self.explainer = Explainer(self.store, self.registry, max_pixels)
        if create:
            self.open(create=True)

    # -- lifetime -----------------------------------------------------------------------------
    def open(self, create: bool = False) -> None:
        """Open the library now: :class:`NoLibraryError` if there is none, unless ``create`` makes it."""
        if create:
            self._make_home()
        self.store.open(create=create)
        if self.read_only:
            self.cache.defer_saves = True  # index files are a cache: one this user cannot write stays behind

    @property
    def read_only(self) -> bool:
        """True for a library this user can read but not write (another user's, a read-only disk)."""
        home_locked = self.home.is_dir() and not os.access(self.home, os.W_OK)
        return self.store.read_only or home_locked

    def _writable(self, create: bool = False) -> None:
        """Before a write: the library exists (``create``: is made now) and this user can write it."""
        if not create:
            self.store.open()  # NoLibraryError: a write that needs a library never starts one
        self.open(create=True)
        if self.read_only:
            raise ReadOnlyError(
                f"the library at {self.home} is read-only for this user; reading it works (query, info, check), "
                "writing needs its owner or a copy"
            )

    def _make_home(self) -> None:
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise from_os_error(exc, f"cannot create the library folder {self.home}") from None

    def close(self) -> None:
        try:
            if not self.read_only:
                self.cache.flush()
        except (LockedError, ReadOnlyError, DiskFullError, OSError) as exc:
            # The files are a cache: the next open catches up anyway. An error here must not hide the
            # error that ended the work.
            log.warning("index files not saved: %s", exc)
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def defer_index_saves(self, defer: bool = True) -> bool:
        """Write index files on :meth:`flush` (and close) instead of after every change; the old setting.

        For a long-running service taking single uploads: saving a large index per upload would
        cost more than the upload itself.
        """
        before = self.cache.defer_saves
        self.cache.defer_saves = defer
        if before and not defer:
            self.cache.flush()
        return before

    def flush(self, wait: bool = True) -> None:
        """Write the index files whose saving was deferred; ``wait=False``: skip if another writer is busy."""
        self.cache.flush(wait)

    def refresh(self) -> None:
        """Pick up what other processes committed: new models, new or removed vectors."""
        self.cache.refresh(self.registry.refresh())

    def refresh_vectors(self) -> None:
        """Pick up other processes' new or removed vectors; safe while other threads search."""
        self.cache.refresh({m.name: m for m in self.store.models()})

    def models_changed(self) -> bool:
        """True if another process made, replaced or deleted a model since the last :meth:`refresh`."""
        return self.registry.changed()

    # -- paths --------------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        return self.layout.model_dir(name)

    def index_path(self, name: str) -> Path:
        return self.layout.index_path(name)

    # -- models -------------------------------------------------------------------------------
    def model(self, name: str) -> Model:
        return self.registry.model(name)

    def models(self) -> list[ModelInfo]:
        return self.registry.models()

    def encoder(self, name: str) -> Encoder:
        return self.registry.encoder(name)

    def vector_index(self, name: str) -> VectorIndex:
        """The model's FAISS index, loaded and in step with the database."""
        return self.cache.index(self.registry.model(name))

    def create_model(self, name: str, kind: str, data: str | None = None, **kwargs: Any) -> ModelInfo:
        """Make (train) a named model; see :meth:`ModelRegistry.create_model`."""
        self._writable(create=True)
        return self.registry.create_model(name, kind, data, **kwargs)

    def fit_model(self, name: str, kind: str, images: np.ndarray, spec: InputSpec, **kwargs: Any) -> ModelInfo:
        self._writable(create=True)
        return self.registry.fit_model(name, kind, images, spec, **kwargs)

    def delete_model(self, name: str) -> ModelInfo:
        """Delete a model with its index and checkpoints (the images stay); returns what it was."""
        self._writable()
        return self.registry.delete_model(name)

    # -- indexing and searching ---------------------------------------------------------------
    def index(self, data: str, model: str, **kwargs: Any) -> IndexReport:
        """Bulk-index a folder into a model; see :meth:`BulkIndexer.run`."""
        return self.index_models(data, [model], **kwargs)[0]

    def index_models(self, data: str, models: list[str], prune: bool = False, **kwargs: Any) -> list[IndexReport]:
        """Bulk-index a folder into several models at once, each file read and decoded once; one report each.

        ``ray=RayOptions(address)`` (:mod:`embedsearch.core.ray_bulk`) reads, decodes and encodes on Ray.
        Each report lists the indexed files under ``data`` that are gone from disk (``missing``);
        ``prune`` forgets their images, as :meth:`remove` does (from every model).
        """
        self._writable(create=True)
        reports = self.bulk.run(data, models, **kwargs)
        if prune and reports[0].missing:
            pruned = self.library.remove(reports[0].missing)
            for report in reports:
                report.pruned = pruned
        return reports

    def reindex(
        self,
        model: str,
        index: str = "auto",
        memory: str | int | None = None,
        target_recall: float = 0.95,
        seed: int = 0,
        shards: int = 1,
        ray: RayOptions | None = None,
    ) -> ReindexResult:
        """Rebuild a model's index from its stored vectors as ``index`` (flat, hnsw, ivf, ivfpq or
        auto: by size and ``memory``, e.g. "4G"), tuned to ``target_recall``; see embedsearch.core.reindex.
        ``shards`` > 1 adds an IVF type's vectors in that many parallel jobs (embedsearch.core.shards):
        threads here, or Ray tasks with ``ray=RayOptions(address)``."""
        self._writable()
        if ray is not None:
            ray_bulk.ray_module()  # one line saying how to install it, before any work
        run = ray_bulk.shard_runner(ray) if ray is not None else None
        return self.reindexer.run(model, index, memory, target_recall, seed, shards=shards, run=run)

    def query(
        self,
        images: list[str],
        model: str,
        k: int = 10,
        batch_size: int = 256,
        include_generated: bool = False,
        label: str | None = None,
        under: str | None = None,
    ) -> Iterator[QueryResult | tuple[str, str]]:
        """Neighbours of image files, folders and ``id:N`` items; ``label`` / ``under`` (a path) filter
        the results; see :meth:`Search.query`."""
        return self.search.query(images, model, k, batch_size, include_generated, label, under)

    def search_vectors(
        self,
        vectors: np.ndarray,
        model: str,
        k: int = 10,
        include_generated: bool = False,
        label: str | None = None,
        under: str | None = None,
    ) -> list[list[Neighbour]]:
        return self.search.vectors(vectors, model, k, include_generated, self.search.allowed(label, under))

    def search_bytes(
        self,
        data: bytes,
        model: str,
        k: int = 10,
        include_generated: bool = False,
        name: str = "<upload>",
        max_pixels: int | None = None,
        label: str | None = None,
        under: str | None = None,
    ) -> list[Neighbour]:
        return self.query_bytes(data, model, k, include_generated, name, max_pixels, label, under).results

    def query_bytes(
        self,
        data: bytes,
        model: str,
        k: int = 10,
        include_generated: bool = False,
        name: str = "<upload>",
        max_pixels: int | None = None,
        label: str | None = None,
        under: str | None = None,
    ) -> QueryResult:
        """:meth:`search_bytes` with the query's out-of-distribution percentile (``ood_percentile``)."""
        return self.search.query_bytes(data, model, k, include_generated, name, max_pixels, label, under)

    def search_image(
        self,
        image_id: int,
        model: str,
        k: int = 10,
        include_generated: bool = False,
        label: str | None = None,
        under: str | None = None,
    ) -> list[Neighbour]:
        return self.query_image(image_id, model, k, include_generated, label, under).results

    def query_image(
        self,
        image_id: int,
        model: str,
        k: int = 10,
        include_generated: bool = False,
        label: str | None = None,
        under: str | None = None,
    ) -> QueryResult:
        """:meth:`search_image` with the percentile of the image's stored novelty (``ood_percentile``)."""
        return self.search.query_image(image_id, model, k, include_generated, label, under)

    def encode_files(self, paths: list[str], model: str) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
        return self.search.encode_files(paths, model)

    def explain(
        self,
        model: str,
        query: str | int | bytes,
        hits: list[int],
        name: str = "<upload>",
        max_pixels: int | None = None,
    ) -> Explanation:
        """What an AE or VAE kept of a query (a path, ``id:N``, an image id or an image's bytes) and of
        each hit (image ids): decoded codes, and for a VAE the decoded midpoints; see core/explain.py."""
        return self.explainer.explain(model, query, hits, name, max_pixels)

    def generated_ids(self) -> set[int]:
        return self.cache.generated()

    def duplicates(
        self, model: str, threshold: float | None = None, k: int | None = None, data: str | None = None, **kwargs: Any
    ) -> DuplicateReport:
        """Near-duplicate groups of a model's images (``data``: index that folder first, as :meth:`index`
        does with ``kwargs``, and add its exact copies); see :mod:`embedsearch.core.dedup`."""
        if data is not None:
            self.index(data, model, **kwargs)
        return self.duplicate_finder.find(model, threshold, k, data)

    # -- images -------------------------------------------------------------------------------
    def add_image(
        self, data: bytes, label: str | None = None, models: list[str] | None = None, name: str = "<upload>"
    ) -> Added:
        self._writable()
        return self.library.add_image(data, label, models, name)

    def image(self, image_id: int) -> ImageRecord:
        return self.library.image(image_id)

    def image_file(self, image_id: int) -> tuple[Path, str]:
        return self.library.image_file(image_id)

    def image_bytes(self, image_id: int) -> tuple[bytes, str]:
        """An image's bytes, verified against its recorded size and sha256; see ImageLibrary.image_bytes."""
        return self.library.image_bytes(image_id)

    def thumbnail(self, image_id: int, size: int = DEFAULT_SIZE) -> Thumbnail:
        """A small WebP of an image (cached in HOME/thumbs by content hash); see embedsearch.core.thumbs."""
        return self.thumbs.thumbnail(image_id, size)

    def delete_image(self, image_id: int) -> None:
        self._writable()
        self.library.delete_image(image_id)

    def remove(self, paths: list[str]) -> int:
        self._writable()
        return self.library.remove(paths)

    def remove_generated(self) -> int:
        self._writable()
        return self.library.remove_generated()

    def owns(self, path: Path) -> bool:
        return self.layout.owns(path)

    def stored_path(self, sha256: str, fmt: str, folder: str = "uploads") -> Path:
        return self.layout.stored_path(sha256, fmt, folder)

    def reconstruct(self, paths: list[str], model: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        return self.library.reconstruct(paths, model)

    def stats(self) -> dict[str, Any]:
        return self.library.stats()

    # -- browsing -----------------------------------------------------------------------------
    def images(self, label: str | None = None, offset: int = 0, limit: int = 48) -> ImagePage:
        """A page of the library's images in the order they were added (``label``: only those)."""
        return self.browser.images(label, offset, limit)

    def labels(self) -> list[LabelCount]:
        """Every label with its number of images, most common first."""
        return self.browser.labels()

    def vector_map(self, model: str, seed: int = 0) -> VectorMap:
        """A 2-D PCA of (a seeded sample of) a model's vectors, cached until they change; see core.browse."""
        return self.browser.vector_map(model, seed)

    # -- generating, checking ----------------------------------------------------------------
    def generate(self, model: str, **kwargs: Any) -> Generation:
        """Candidates from a model's decoder; the options are :class:`GenerateRequest`'s fields."""
        if kwargs.get("add"):
            self._writable()
        return self.generator.generate(model, GenerateRequest(**kwargs))

    def check(self, repair: bool = False, dry_run: bool = False) -> CheckReport:
        """Verify (and with ``repair``, mend; with ``dry_run``, plan) index, metadata, checkpoints, stored files.

        Never on a library that does not exist: repairing an empty new database would find every
        stored file unknown.
        """
        self._writable() if repair and not dry_run else self.open()
        return self.checker.check(repair, dry_run)

    def info(self) -> LibraryInfo:
        disk = {
            "database": self.store.size_bytes(),
            "indexes": disk_size(self.home / "indexes"),
            "models": disk_size(self.home / "models"),
            "thumbnails": disk_size(self.home / THUMBS),
        }
        return LibraryInfo(str(self.home), self.db_url, self.store.counts()["images"], self.models(), disk)
