"""Bulk indexing: scan -> decode (worker processes) -> encode -> one transaction per batch.

Each batch is committed to the database in one transaction (images and their vectors together),
then added to the in-memory FAISS index through the index cache, which writes the file when the
run ends. A run killed at any moment therefore loses at most the batch in flight, and the next run (or any open) brings
the FAISS file up to date from the database: every good image ends up indexed exactly once.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedsearch.core.index_cache import IndexCache
from embedsearch.core.models import ModelRegistry
from embedsearch.core.schema import Model
from embedsearch.core.store import Store
from embedsearch.data.images import infer_spec, scan
from embedsearch.data.ingest import Decoded, decode_all, plan, uses_pool
from embedsearch.encoders.base import REGISTRY, Encoder, encoder_class
from embedsearch.errors import DiskFullError, InvalidArgumentError, UnknownModelError
from embedsearch.results import IndexReport

log = logging.getLogger(__name__)


class _Batch:
    """Decoded files waiting to be encoded and committed together."""

    def __init__(self) -> None:
        self.pixels: list[np.ndarray] = []
        self.keys: list[int | str] = []  # image id, or sha256 of an image not stored yet
        self.new_images: list[dict[str, Any]] = []
        self.changed: list[dict[str, Any]] = []
        self.deleted: list[int] = []  # paths whose new content is stored under another path already
        self.touched: list[tuple[int, float]] = []  # same content, new mtime

    def __len__(self) -> int:
        return len(self.pixels)


def _ensure_model(registry: ModelRegistry, store: Store, data: str, model: str, metric: str | None) -> None:
    """``--model pixels`` on a library without it creates it from the data (pixels needs no training)."""
    existing = store.model(model)
    if existing is not None:
        if metric is not None and metric != existing.metric:
            raise InvalidArgumentError(
                f"model {model!r} was made with --metric {existing.metric}; create another model for {metric}"
            )
        return
    if model in REGISTRY and not encoder_class(model).needs_training:
        spec = infer_spec([f.path for f in scan(data) if f.size >= 0])
        registry.create_model(model, model, data, image_size=spec.image_size, channels=spec.channels, metric=metric)
        return
    raise UnknownModelError(model, [m.name for m in store.models()])


class BulkIndexer:
    """Indexes a folder into one model, batch by batch, under the writer lock."""

    def __init__(self, store: Store, cache: IndexCache, registry: ModelRegistry, max_pixels: int) -> None:
        self.store = store
        self.cache = cache
        self.registry = registry
        self.max_pixels = max_pixels

    def run(
        self,
        data: str,
        model: str,
        *,
        metric: str | None = None,
        batch_size: int = 2048,
        workers: int | None = None,
        progress: bool = False,
    ) -> IndexReport:
        started = time.perf_counter()
        with self.cache.writing():  # decide whether to create the model under the lock: no run may race us
            _ensure_model(self.registry, self.store, data, model, metric)
            encoder = self.registry.encoder(model)
            row = self.registry.model(model)
            index = self.cache.index(row)  # in step with what other writers committed: we hold the lock
            known = self.store.known_files(row.id)
            work = plan(data, known)
            report = IndexReport(
                model, scanned=work.scanned, unchanged=work.unchanged, skipped_endings=dict(work.skipped)
            )
            state = _State(known, self.store.all_shas() if work.todo else {}, set(index.ids().tolist()))
            bar = _progress(len(work.todo), progress)
            batch = _Batch()
            sharing = encoder.sharing_cores() if uses_pool(len(work.todo), workers) else nullcontext()
            try:
                with sharing:
                    for item in decode_all(work.todo, encoder.spec, self.max_pixels, workers):
                        bar.update(1)
                        _route(item, state, batch, report)
                        if len(batch) + len(batch.touched) >= batch_size:
                            self._flush(row, encoder, batch, state)
                            batch = _Batch()
                    self._flush(row, encoder, batch, state)
            except DiskFullError as exc:
                raise exc.keeping(_committed(state)) from None
            finally:
                bar.close()
        report.seconds = time.perf_counter() - started
        return report

    def _flush(self, row: Model, encoder: Encoder, batch: _Batch, state: _State) -> None:
        if not (len(batch) or batch.touched or batch.deleted):
            return
        empty = np.zeros((0, encoder.code_width), encoder.code_dtype)
        vectors = encoder.encode(np.stack(batch.pixels)) if len(batch) else empty  # (N, dim) float32, or bits
        blobs = [v.tobytes() for v in vectors]
        new_ids = self.store.write_batch(
            row.id,
            batch.new_images,
            batch.changed,
            list(zip(batch.keys, blobs, strict=True)),
            deleted=batch.deleted,
            touched=batch.touched,
        )
        state.shas.update(new_ids)
        state.batches, state.committed = state.batches + 1, state.committed + len(batch)
        ids = np.array([new_ids[k] if isinstance(k, str) else k for k in batch.keys], dtype=np.int64)
        self.cache.remove_images(batch.deleted)  # deleted rows leave every model's index
        self.cache.add(row, ids, vectors)
        state.indexed.update(ids.tolist())


@dataclass
class _State:
    """What a run knows while it routes files: the store's view plus what it has added."""

    known: dict[str, tuple[int, int, float | None, str, bool]]  # path -> id, bytes, mtime, sha, indexed
    shas: dict[str, int]  # sha256 -> image id, for every stored image
    indexed: set[int]  # image ids in this model's index
    seen: dict[str, str] = field(default_factory=dict)  # sha256 -> path, files met in this run
    batches: int = 0  # batches this run committed
    committed: int = 0  # images (new or re-encoded) in them
    #: sha256 -> (values, pixels) of files met as copies of a stored image: if that image's own
    #: file turns out to have changed later in the run, the copy takes its place.
    copies: dict[str, tuple[dict[str, Any], np.ndarray]] = field(default_factory=dict)
    path_of: dict[int, str] = field(init=False)  # image id -> path of the stored images

    def __post_init__(self) -> None:
        self.path_of = {values[0]: path for path, values in self.known.items()}


def _committed(state: _State) -> str:
    """What a run that failed had kept, for its error message."""
    if not state.batches:
        return "nothing of this run was committed (earlier runs' images are kept)"
    images = f"{state.committed} image{'s' if state.committed != 1 else ''}"
    return f"everything up to batch {state.batches} ({images}) is committed"


def _route(item: Decoded, state: _State, batch: _Batch, report: IndexReport) -> None:
    """Decide what one decoded file is: failed, unchanged, duplicate, changed or new."""
    info, meta, pixels = item.file, item.meta, item.pixels
    if item.error is not None or meta is None or pixels is None:
        report.failed.append((info.path, item.error or "unknown error"))
        log.warning("skipped %s: %s", info.path, item.error)
        return
    old = state.known.get(info.path)
    if old is not None and old[3] == meta.sha256:  # same content, only touched
        state.seen.setdefault(meta.sha256, info.path)
        batch.touched.append((old[0], info.mtime))
        if old[0] in state.indexed:
            report.unchanged += 1
        else:
            _queue(batch, state, old[0], pixels)
            report.added += 1
        return
    values = {
        "path": info.path,
        "sha256": meta.sha256,
        "width": meta.width,
        "height": meta.height,
        "format": meta.format,
        "mode": meta.mode,
        "label": info.label,
        "bytes": meta.bytes,
        "mtime": info.mtime,
    }
    first = state.seen.setdefault(meta.sha256, info.path)
    stored = state.shas.get(meta.sha256)
    if first != info.path or stored is not None:
        _duplicate(pixels, values, stored, first, old, state, batch, report)
    elif old is None:
        batch.new_images.append(values)
        _queue(batch, state, meta.sha256, pixels)
        report.added += 1
    elif _moved_to_copy(old, state, batch, report):
        batch.new_images.append(values)  # the row went to a copy of its old content: this file is new
        _queue(batch, state, meta.sha256, pixels)
        report.added += 1
    else:  # new content at a known path: its row is rewritten and re-encoded
        _rewrite(batch, state, old[0], values, pixels)
        state.shas.pop(old[3], None)  # its old content is gone: a later copy of it is new, not a duplicate
        state.shas[meta.sha256] = old[0]
        report.updated += 1


def _duplicate(
    pixels: np.ndarray,
    values: dict[str, Any],
    stored: int | None,
    first: str,
    old: tuple[int, int, float | None, str, bool] | None,
    state: _State,
    batch: _Batch,
    report: IndexReport,
) -> None:
    """A file whose content is stored already, or was met earlier in this run."""
    if old is not None and not _moved_to_copy(old, state, batch, report):
        # First, as the stored image may take over this path below (rows are deleted, then rewritten).
        batch.deleted.append(old[0])  # this path's old content is nowhere else: its row goes
        state.indexed.discard(old[0])
        state.shas.pop(old[3], None)
        state.path_of.pop(old[0], None)
    was_at = state.path_of.get(stored) if stored is not None else None  # None: stored in this run
    if stored is not None and was_at is not None and not os.path.exists(was_at):
        # The stored image's file is gone (renamed or moved): the image follows its content here.
        log.info("%s: the stored image of %s, whose file is gone", values["path"], was_at)
        _rewrite(batch, state, stored, values, pixels)
        report.updated += 1
        return
    report.duplicates += 1
    log.info("%s: same content as %s", values["path"], first if first != values["path"] else "a stored image")
    if stored is not None:
        # If the stored image's own file turns out to have changed later in the run, this copy
        # takes its place (a swap of two files' contents, say).
        state.copies.setdefault(values["sha256"], (values, pixels))
        if stored not in state.indexed:
            _queue(batch, state, stored, pixels)  # stored elsewhere, not yet in this model's index


def _moved_to_copy(
    old: tuple[int, int, float | None, str, bool], state: _State, batch: _Batch, report: IndexReport
) -> bool:
    """A known path lost its content: if a copy of that content was met earlier in the run, the
    stored image moves to the copy's path (re-encoded, as its row is rewritten) and True is returned."""
    copy = state.copies.pop(old[3], None)
    if copy is None:
        return False
    _rewrite(batch, state, old[0], *copy)
    report.duplicates -= 1  # the copy is now the stored image itself
    report.updated += 1
    return True


def _rewrite(batch: _Batch, state: _State, image_id: int, values: dict[str, Any], pixels: np.ndarray) -> None:
    """The stored image ``image_id`` is now the file ``values`` describes: its row is rewritten and re-encoded."""
    batch.changed.append({"id": image_id, **values})
    _queue(batch, state, image_id, pixels)
    state.path_of[image_id] = values["path"]


def _queue(batch: _Batch, state: _State, key: int | str, pixels: np.ndarray) -> None:
    batch.keys.append(key)
    batch.pixels.append(pixels)
    if isinstance(key, int):
        state.indexed.add(key)  # queued counts as indexed: never queue one image twice


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled or total == 0, leave=False, dynamic_ncols=True)
