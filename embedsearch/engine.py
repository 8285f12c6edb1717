"""The core: one :class:`Engine` over a library home. The CLI and the HTTP service only call it.

A library home holds ``library.db`` (metadata, unless ``--db`` names another database),
``indexes/<model>.faiss`` (one exact FAISS index per model) and ``models/<name>/`` (config.json
and weights). Writers (index, remove, train) hold ``library.lock``; readers never wait.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .encoders import REGISTRY, Encoder, encoder_class, write_config
from .errors import DataError, ImageError, InvalidArgumentError, LockedError, ModelError, UnknownModelError
from .datasets import data_spec, load_dataset
from .images import DEFAULT_MAX_PIXELS, InputSpec, decode_file, scan
from .index import METRICS, VectorIndex
from .store import Model, Store

log = logging.getLogger(__name__)

DEFAULT_HOME = "indexes"
LOCK_TIMEOUT = 600.0


@dataclass
class Neighbour:
    rank: int
    id: int
    path: str | None
    label: str | None
    distance: float


@dataclass
class QueryResult:
    query: str
    model: str
    results: list[Neighbour]


@dataclass
class ModelInfo:
    name: str
    kind: str
    dim: int
    metric: str
    image_size: int
    channels: int
    vectors: int
    created_at: str
    checkpoint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class LibraryInfo:
    home: str
    database: str
    images: int
    models: list[ModelInfo]
    disk_bytes: dict[str, int]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


class Engine:
    """An opened library. Cheap to open: models and indexes load on first use."""

    def __init__(self, home: str | os.PathLike[str] | None = None, db: str | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.home = Path(home or os.environ.get("EMBEDSEARCH_HOME") or DEFAULT_HOME).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.db_url = db or os.environ.get("EMBEDSEARCH_DB") or f"sqlite:///{self.home / 'library.db'}"
        self.max_pixels = max_pixels
        self.store = Store(self.db_url)
        self._encoders: dict[str, Encoder] = {}
        self._indexes: dict[str, VectorIndex] = {}
        self._models: dict[str, Model] = {}

    def close(self) -> None:
        self.store.close()

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
        """Hold the library's writer lock; say so on the log when another writer makes us wait."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.home / "library.lock"))
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

    # -- models -------------------------------------------------------------------------------
    def model(self, name: str) -> Model:
        if name not in self._models:
            model = self.store.model(name)
            if model is None:
                raise UnknownModelError(name, [m.name for m in self.store.models()])
            self._models[name] = model
        return self._models[name]

    def _forget(self, name: str) -> None:
        for cache in (self._models, self._encoders, self._indexes):
            cache.pop(name, None)

    def models(self) -> list[ModelInfo]:
        counts = self.store.entry_counts()
        return [self._model_info(m, counts.get(m.id, 0)) for m in self.store.models()]

    @staticmethod
    def _model_info(m: Model, vectors: int) -> ModelInfo:
        return ModelInfo(m.name, m.kind, m.dim, m.metric, m.image_size, m.channels, vectors,
                         m.created_at.isoformat(timespec="seconds"), m.checkpoint_path, m.config)

    def encoder(self, name: str) -> Encoder:
        """The model's encoder, its checkpoint checked against the hash recorded when it was made."""
        if name in self._encoders:
            return self._encoders[name]
        model = self.model(name)
        cls = encoder_class(model.kind)
        if model.checkpoint_path:
            weights = self.home / model.checkpoint_path
            if not weights.is_file():
                raise ModelError(f"model {name!r}: checkpoint {weights} is missing; retrain it with 'embedsearch train'")
            if file_sha256(weights) != model.checkpoint_sha256:
                raise ModelError(f"model {name!r}: checkpoint {weights} does not match its recorded sha256 "
                                 "(modified or corrupt); retrain the model")
        options = cls.Options.from_dict(model.config.get("options", {}))
        spec = InputSpec(model.image_size, model.channels)
        encoder = cls.load(self.model_dir(name), spec, model.dim, options)
        self._encoders[name] = encoder
        return encoder

    def create_model(self, name: str, kind: str, data: str | None = None, *, image_size: int | None = None,
                     channels: int | None = None, metric: str = "l2", options: dict[str, Any] | None = None,
                     resume: bool = False, replace: bool = False) -> ModelInfo:
        """Make (train) a named model from ``data`` (a folder or an IDX images file) and register it."""
        cls = encoder_class(kind)
        cls.Options.from_dict(options or {})  # refuse bad options before reading any data
        if image_size is not None and channels is not None:
            spec = InputSpec(image_size, channels)
        elif data is None:
            raise DataError(f"model kind {kind!r} needs DATA (or --image-size and --channels)")
        else:
            spec = data_spec(data, image_size, channels)
        images = np.zeros((0, *spec.shape), np.uint8)
        if cls.needs_training:
            if data is None:
                raise DataError(f"model kind {kind!r} needs DATA to learn from")
            dataset = load_dataset(data, spec, self.max_pixels)
            for path, reason in dataset.failed:
                log.warning("skipped %s: %s", path, reason)
            images = dataset.images
        return self.fit_model(name, kind, images, spec, metric=metric, options=options, resume=resume,
                              replace=replace, source=data)

    def fit_model(self, name: str, kind: str, images: np.ndarray, spec: InputSpec, *, metric: str = "l2",
                  options: dict[str, Any] | None = None, resume: bool = False, replace: bool = False,
                  source: str | None = None) -> ModelInfo:
        """Train a model of ``kind`` on (N, S, S, C) uint8 ``images`` and register it as ``name``."""
        cls = encoder_class(kind)
        opts = cls.Options.from_dict(options or {})
        if metric not in METRICS:
            raise InvalidArgumentError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        if not name or "/" in name or name.startswith("."):
            raise InvalidArgumentError(f"{name!r} is not a usable model name")
        if self.store.model(name) is not None and not (replace or resume):
            raise InvalidArgumentError(f"model {name!r} exists already; pass --replace to retrain it "
                                       "(its index is emptied) or choose another --name")
        if cls.needs_training and len(images) == 0:
            raise DataError(f"{source or 'the data'}: no usable images to train on")
        if images.shape[1:] != spec.shape:
            raise InvalidArgumentError(f"images of shape {images.shape[1:]} do not match the input {spec.shape}")
        workdir = self.model_dir(name)
        workdir.mkdir(parents=True, exist_ok=True)
        log.info("making %s model %r (%dx%dx%d input) from %d images", kind, name, *spec.shape, len(images))
        encoder = cls.fit(images, spec, opts, workdir, resume=resume)
        return self._register(name, encoder, metric, source, len(images))

    def _register(self, name: str, encoder: Encoder, metric: str, data: str | None, n: int) -> ModelInfo:
        workdir = self.model_dir(name)
        weights = encoder.save(workdir)
        config = {"name": name, "kind": encoder.kind, "image_size": encoder.spec.image_size,
                  "channels": encoder.spec.channels, "dim": encoder.dim, "metric": metric,
                  "options": encoder.options.to_dict(), "version": __version__,
                  "data": {"source": str(data) if data else None, "images": n}, **encoder.summary()}
        write_config(workdir, config)
        with self.writing():
            model = self.store.replace_model(
                name, kind=encoder.kind, config=config, dim=encoder.dim, metric=metric,
                image_size=encoder.spec.image_size, channels=encoder.spec.channels,
                checkpoint_path=str(weights.relative_to(self.home)) if weights else None,
                checkpoint_sha256=file_sha256(weights) if weights else None)
            for suffix in ("", ".json"):
                Path(str(self.index_path(name)) + suffix).unlink(missing_ok=True)
        self._forget(name)
        self._encoders[name] = encoder
        return self._model_info(model, 0)

    def delete_model(self, name: str) -> None:
        self.model(name)
        with self.writing():
            self.store.delete_model(name)
            for suffix in ("", ".json"):
                Path(str(self.index_path(name)) + suffix).unlink(missing_ok=True)
            shutil.rmtree(self.model_dir(name), ignore_errors=True)
        self._forget(name)

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
            index = VectorIndex.load(path, model.dim, model.metric) if path.exists() else VectorIndex(model.dim, model.metric)
            index.sync(self.store, model.id)
            self._indexes[name] = index
        return index

    def refresh(self) -> None:
        """Pick up what other processes committed: new models, new or removed vectors."""
        before = dict(self._models)
        self._models.clear()
        for name, index in list(self._indexes.items()):
            model = self.store.model(name)
            if model is None or name not in before or model.id != before[name].id:
                self._forget(name)  # deleted or retrained elsewhere: load afresh when next used
                continue
            self._models[name] = model
            index.sync(self.store, model.id)

    def save_index(self, name: str) -> None:
        index = self._indexes.get(name)
        if index is not None:
            index.save(self.index_path(name))

    # -- operations ---------------------------------------------------------------------------
    def index(self, data: str, model: str, **kwargs: Any) -> Any:
        from .bulk import bulk_index

        return bulk_index(self, data, model, **kwargs)

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

    def search_vectors(self, vectors: np.ndarray, model: str, k: int = 10) -> list[list[Neighbour]]:
        """Nearest indexed images of each vector (N, dim), with their metadata."""
        if k < 1:
            raise InvalidArgumentError("k must be at least 1")
        index = self.vector_index(model)
        dist, ids = index.search(vectors, min(k, max(len(index), 1)))
        found = self.store.labels_paths(sorted({int(i) for i in ids.ravel() if i >= 0}))
        out = []
        for drow, irow in zip(dist, ids):
            hits = [(float(d), int(i)) for d, i in zip(drow, irow) if i >= 0 and int(i) in found]
            out.append([Neighbour(r, i, *found[i], d) for r, (d, i) in enumerate(hits, 1)])
        return out

    def query(self, images: list[str], model: str, k: int = 10, batch_size: int = 256
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
            for path, hits in zip(used, self.search_vectors(vectors, model, k)):
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
        disk = {"database": _dir_size(self.home / "library.db") + _dir_size(self.home / "library.db-wal"),
                "indexes": _dir_size(self.home / "indexes"), "models": _dir_size(self.home / "models")}
        return LibraryInfo(str(self.home), self.db_url if "://" in self.db_url else self.db_url,
                           self.store.counts()["images"], self.models(), disk)


def to_dict(obj: Any) -> Any:
    return asdict(obj)


def kinds() -> list[str]:
    return list(REGISTRY)


__all__ = ["Engine", "LibraryInfo", "ModelInfo", "Neighbour", "QueryResult", "time"]
