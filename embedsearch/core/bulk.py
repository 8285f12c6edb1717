"""Bulk indexing: scan -> decode (worker processes) -> encode -> one transaction per batch.

On Ray (``ray=RayOptions(...)``, :mod:`embedsearch.core.ray_bulk`) the workers read, decode and
encode; the driver still scans, routes and commits, so the results are the same.

Each batch is committed to the database in one transaction (images and their vectors together),
then added to the in-memory FAISS index through the index cache, which writes the file when the
run ends. Batch N is encoded on a thread while N+1 is routed and N-1 committed (:mod:`embedsearch.core.overlap`),
so a run killed at any moment loses at most the two batches in flight, and the next run (or any open) brings
the FAISS file up to date from the database: every good image ends up indexed exactly once.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Generator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from embedsearch import interrupts
from embedsearch.core import novelty
from embedsearch.core.index_cache import IndexCache
from embedsearch.core.models import ModelRegistry
from embedsearch.core.overlap import Overlap
from embedsearch.core.ray_bulk import RayOptions, RayStart, encode_on_ray, require_ray
from embedsearch.core.schema import Model
from embedsearch.core.store import Store
from embedsearch.data.images import FileInfo, InputSpec, infer_spec, scan
from embedsearch.data.ingest import Decoded, decode_all, plan, uses_pool
from embedsearch.encoders.base import REGISTRY, DecodingEncoder, Encoder, encoder_class
from embedsearch.errors import DiskFullError, InvalidArgumentError, UnknownModelError
from embedsearch.progress import bar
from embedsearch.results import IndexReport

log = logging.getLogger(__name__)


class _Batch:
    """Decoded files waiting to be encoded and committed together: image rows, and per model what to encode."""

    def __init__(self, models: int) -> None:
        self.keys: list[list[int | str]] = [[] for _ in range(models)]  # image id, or sha256 of a new image
        self.inputs: list[list[np.ndarray]] = [[] for _ in range(models)]  # pixels, or codes (Ray)
        self.sampled: list[list[bool]] = [[] for _ in range(models)]  # whose novelty to store (novelty.SAMPLE)
        self.new_images: list[dict[str, Any]] = []
        self.changed: list[dict[str, Any]] = []
        self.deleted: list[int] = []  # paths whose new content is stored under another path already
        self.touched: list[tuple[int, float]] = []  # same content, new mtime

    def __len__(self) -> int:
        return max(len(keys) for keys in self.keys)


@dataclass
class _Target:
    """One model a run indexes into: which decoded view it encodes, what its index holds, its report."""

    row: Model
    encoder: Encoder
    view: int  # position of the model's input spec among the run's distinct specs
    indexed: set[int]  # image ids in this model's index, or queued for it in this run
    report: IndexReport
    rate: float = 1.0  # the share of this run's images whose novelty is measured (novelty.sample_rate)


def _ensure_model(
    registry: ModelRegistry,
    store: Store,
    data: str,
    files: list[FileInfo],
    model: str,
    metric: str | None,
    fit: str | None,
) -> None:
    """``--model pixels`` on a library without it creates it from the data (pixels needs no training)."""
    existing = store.model(model)
    if existing is not None:
        if metric is not None and metric != existing.metric:
            raise InvalidArgumentError(
                f"model {model!r} was made with --metric {existing.metric}; create another model for {metric}"
            )
        made = existing.fit
        if fit is not None and fit != made:
            raise InvalidArgumentError(f"model {model!r} was made with --fit {made}; create another model for {fit}")
        return
    if model in REGISTRY and not encoder_class(model).needs_training:
        spec = infer_spec([f.path for f in files if f.size >= 0])
        registry.create_model(
            model, model, data, image_size=spec.image_size, channels=spec.channels, metric=metric, fit=fit or "pad"
        )
        return
    raise UnknownModelError(model, [m.name for m in store.models()])


class BulkIndexer:
    """Indexes a folder into one or more models, batch by batch, under the writer lock.

    Each file is read and decoded once for all the models (once per distinct input spec), and each
    batch's image rows and every model's vectors are committed in one transaction.
    """

    def __init__(self, store: Store, cache: IndexCache, registry: ModelRegistry, max_pixels: int) -> None:
        self.store = store
        self.cache = cache
        self.registry = registry
        self.max_pixels = max_pixels

    def run(
        self,
        data: str,
        models: list[str],
        *,
        metric: str | None = None,
        fit: str | None = None,
        batch_size: int = 2048,
        workers: int | None = None,
        progress: bool = False,
        ray: RayOptions | None = None,
    ) -> list[IndexReport]:
        """Index ``data`` into every model of ``models``; one report per model, in that order.

        With ``ray`` the files are read, decoded and encoded on a Ray cluster (``workers``: how many
        Ray workers); everything else, and the result, is the same as without.
        """
        started = time.perf_counter()
        names = list(dict.fromkeys(models))  # each once, in the order given
        if not names:
            raise InvalidArgumentError("name at least one model to index into")
        if ray is not None:
            require_ray()  # missing Ray is one line before any work, not after the scan
        with self.cache.writing(), ExitStack() as starting:  # models are made under the lock: no run races us
            # A first run into a model reads every file: Ray starts now, beside the scan (else once there is work).
            start = starting.enter_context(RayStart(ray)) if ray is not None and self._new(names) else None
            skipped: Counter[str] = Counter()  # image files of formats not read here, by ending
            files = list(scan(data, skipped))
            for name in names:
                _ensure_model(self.registry, self.store, data, files, name, metric, fit)
            targets, specs = self._targets(names)
            known = self._known(targets)
            work = plan(files, known)
            for target in targets:
                target.report.scanned, target.report.unchanged = work.scanned, work.unchanged
                if isinstance(target.encoder, DecodingEncoder):  # only they have a novelty to sample
                    target.rate = novelty.sample_rate(self.store.scored_count(target.row.id), len(work.todo))
                target.report.skipped_endings = dict(skipped)
            state = _State(known, self.store.all_shas() if work.todo else {}, targets, encoded=ray is not None)
            progress_bar = _Progress(len(work.todo), progress)
            batch = _Batch(len(targets))
            try:
                with ExitStack() as stack:
                    # Ctrl-C stops the run between two files (embedsearch.interrupts), not inside a
                    # commit, a fork or a lock; it is polled until the batches in flight are dropped.
                    stack.enter_context(interrupts.polled())
                    # Batch N is encoded on a thread while batch N+1 is routed and N-1 committed.
                    overlap = Overlap(partial(_encode_batch, state=state), partial(self._write, state=state))
                    batches = stack.enter_context(overlap)
                    # Closed here, not whenever it is collected: its pool or Ray ends at a known point.
                    executor = self._items(work.todo, targets, specs, workers, ray, start, stack)
                    items = stack.enter_context(closing(executor))
                    for item in items:
                        interrupts.check()
                        _route(item, state, batch)
                        progress_bar.update(targets[0].report)
                        if len(batch) + len(batch.touched) >= batch_size:
                            batches.submit(batch)
                            batch = _Batch(len(targets))
                    if len(batch) or batch.touched or batch.deleted:
                        batches.submit(batch)
                    batches.close()
            except DiskFullError as exc:
                raise exc.keeping(_committed(state)) from None
            finally:
                progress_bar.close()
            missing = _missing(self.store, data, files)  # after the run: a moved file's image follows it
        for target in targets:
            target.report.seconds = time.perf_counter() - started
            target.report.missing = missing
        return [target.report for target in targets]

    def _items(
        self,
        todo: list[FileInfo],
        targets: list[_Target],
        specs: list[InputSpec],
        workers: int | None,
        ray: RayOptions | None,
        start: RayStart | None,
        stack: ExitStack,
    ) -> Generator[Decoded, None, None]:
        """The executor, the only difference between a local and a Ray run: decoded files in scan order."""
        if ray is not None:
            encoders = [(t.encoder, t.view) for t in targets]
            return encode_on_ray(todo, encoders, specs, self.max_pixels, ray, workers, start)
        if uses_pool(todo, workers):
            for target in targets:
                stack.enter_context(target.encoder.sharing_cores())
        return decode_all(todo, specs, self.max_pixels, workers)

    def _new(self, names: list[str]) -> bool:
        """Whether a model of the run is new or has no vectors yet."""
        counts = self.store.entry_counts()
        return any((row := self.store.model(name)) is None or not counts.get(row.id) for name in names)

    def _targets(self, names: list[str]) -> tuple[list[_Target], list[InputSpec]]:
        """Each model with its index's ids, and the distinct input specs the files are decoded to."""
        specs: list[InputSpec] = []
        targets = []
        for name in names:
            encoder, row = self.registry.encoder(name), self.registry.model(name)
            if encoder.spec not in specs:
                specs.append(encoder.spec)
            index = self.cache.index(row)  # in step with what other writers committed: we hold the lock
            ids = set(index.ids().tolist())
            targets.append(_Target(row, encoder, specs.index(encoder.spec), ids, IndexReport(name)))
        return targets, specs

    def _known(self, targets: list[_Target]) -> dict[str, tuple[int, int, float | None, str, bool]]:
        """The stored files; "indexed" only where every model has the image (else it is read again)."""
        known = self.store.known_files(targets[0].row.id)
        if len(targets) == 1:
            return known
        return {path: (*v[:4], all(v[0] in t.indexed for t in targets)) for path, v in known.items()}

    def _write(self, batch: _Batch, encoded: list[tuple[np.ndarray, np.ndarray | None]], state: _State) -> None:
        """Commit one encoded batch (image rows and every model's vectors), then add it to the indexes."""
        entries = {
            t.row.id: novelty.entries(keys, vecs, scores)
            for t, keys, (vecs, scores) in zip(state.targets, batch.keys, encoded, strict=True)
        }
        new_ids = self.store.write_batch(
            entries, batch.new_images, batch.changed, deleted=batch.deleted, touched=batch.touched
        )
        state.shas.update(new_ids)
        state.batches, state.committed = state.batches + 1, state.committed + len(batch)
        self.cache.remove_images(batch.deleted)  # deleted rows leave every model's index
        for target, keys, (vecs, _) in zip(state.targets, batch.keys, encoded, strict=True):
            ids = np.array([new_ids[k] if isinstance(k, str) else k for k in keys], dtype=np.int64)
            self.cache.add(target.row, ids, vecs)
            target.indexed.update(ids.tolist())


def _encode_batch(batch: _Batch, state: _State) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Every model's vectors and novelties of a batch (on the run's encoding thread)."""
    return [
        _encode(t.encoder, xs, np.array(sampled, dtype=bool), state.encoded)
        for t, xs, sampled in zip(state.targets, batch.inputs, batch.sampled, strict=True)
    ]


def _encode(
    encoder: Encoder, inputs: list[np.ndarray], sampled: np.ndarray, encoded: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, dim) float32, or (N, bytes) uint8 bits, of a batch's images, and their (N,) novelties
    (NaN outside the ``sampled`` mask) or None (``encoded``: their codes already, novelty included:
    :func:`novelty.with_novelty`)."""
    if not inputs:
        return np.zeros((0, encoder.code_width), encoder.code_dtype), None
    if encoded:
        codes, scores = novelty.split_novelty(encoder, np.stack(inputs))
        return codes, novelty.keep_sampled(scores, sampled)
    return novelty.encode_sampled(encoder, np.stack(inputs), sampled)


@dataclass
class _State:
    """What a run knows while it routes files: the store's view plus what it has added."""

    known: dict[str, tuple[int, int, float | None, str, bool]]  # path -> id, bytes, mtime, sha, indexed
    shas: dict[str, int]  # sha256 -> image id, for every stored image
    targets: list[_Target]
    encoded: bool = False  # the executor's workers encode too (Ray): files come with their codes
    seen: dict[str, str] = field(default_factory=dict)  # sha256 -> path, files met in this run
    batches: int = 0  # batches this run committed
    committed: int = 0  # images (new or re-encoded) in them
    #: sha256 -> (values, inputs) of files met as copies of a stored image: if that image's own
    #: file turns out to have changed later in the run, the copy takes its place.
    copies: dict[str, tuple[dict[str, Any], list[np.ndarray]]] = field(default_factory=dict)
    path_of: dict[int, str] = field(init=False)  # image id -> path of the stored images

    def __post_init__(self) -> None:
        self.path_of = {values[0]: path for path, values in self.known.items()}

    def count(self, what: str, n: int = 1) -> None:
        """An event about an image (not a model's vector): every model's report counts it."""
        for target in self.targets:
            setattr(target.report, what, getattr(target.report, what) + n)

    def forget(self, image_id: int) -> None:
        for target in self.targets:
            target.indexed.discard(image_id)


def _committed(state: _State) -> str:
    """What a run that failed had kept, for its error message."""
    if not state.batches:
        return "nothing of this run was committed (earlier runs' images are kept)"
    images = f"{state.committed} image{'s' if state.committed != 1 else ''}"
    return f"everything up to batch {state.batches} ({images}) is committed"


def _route(item: Decoded, state: _State, batch: _Batch) -> None:
    """Decide what one decoded file is: failed, unchanged, duplicate, changed or new."""
    info, meta = item.file, item.meta
    # Per model, what its encoder takes (its view of the pixels), or its code from a Ray worker.
    inputs = item.codes if state.encoded else [item.views[t.view] for t in state.targets] if item.views else []
    if item.error is not None or meta is None or not inputs:
        for target in state.targets:
            target.report.failed.append((info.path, item.error or "unknown error"))
        log.debug("skipped %s: %s", info.path, item.error)  # listed after the run; a line here would break the bar
        return
    old = state.known.get(info.path)
    if old is not None and old[3] == meta.sha256:  # same content, only touched
        state.seen.setdefault(meta.sha256, info.path)
        batch.touched.append((old[0], info.mtime))
        for target in state.targets:
            if old[0] in target.indexed:
                target.report.unchanged += 1
            else:
                target.report.added += 1
        _queue(batch, state, old[0], inputs, meta.sha256, missing_only=True)
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
        _duplicate(inputs, values, stored, first, old, state, batch)
    elif old is None or _moved_to_copy(old, state, batch):
        # New, or the row went to a copy of its old content: either way this file is a new image.
        batch.new_images.append(values)
        _queue(batch, state, meta.sha256, inputs, meta.sha256)
        state.count("added")
    else:  # new content at a known path: its row is rewritten and re-encoded
        _rewrite(batch, state, old[0], values, inputs)
        state.shas.pop(old[3], None)  # its old content is gone: a later copy of it is new, not a duplicate
        state.shas[meta.sha256] = old[0]
        state.count("updated")


def _duplicate(
    inputs: list[np.ndarray],
    values: dict[str, Any],
    stored: int | None,
    first: str,
    old: tuple[int, int, float | None, str, bool] | None,
    state: _State,
    batch: _Batch,
) -> None:
    """A file whose content is stored already, or was met earlier in this run."""
    if old is not None and not _moved_to_copy(old, state, batch):
        # First, as the stored image may take over this path below (rows are deleted, then rewritten).
        batch.deleted.append(old[0])  # this path's old content is nowhere else: its row goes
        state.forget(old[0])
        state.shas.pop(old[3], None)
        state.path_of.pop(old[0], None)
    was_at = state.path_of.get(stored) if stored is not None else None  # None: stored in this run
    if stored is not None and was_at is not None and not os.path.exists(was_at):
        # The stored image's file is gone (renamed or moved): the image follows its content here.
        log.info("%s: the stored image of %s, whose file is gone", values["path"], was_at)
        _rewrite(batch, state, stored, values, inputs)
        state.count("updated")
        return
    state.count("duplicates")
    log.debug("%s: same content as %s", values["path"], first if first != values["path"] else "a stored image")
    if stored is not None:
        # If the stored image's own file turns out to have changed later in the run, this copy
        # takes its place (a swap of two files' contents, say).
        # A copy of its pixels: a pool's view would keep its whole chunk's array alive for the run.
        state.copies.setdefault(values["sha256"], (values, [x.copy() for x in inputs]))
        # Stored elsewhere, maybe not in every index.
        _queue(batch, state, stored, inputs, values["sha256"], missing_only=True)


def _moved_to_copy(old: tuple[int, int, float | None, str, bool], state: _State, batch: _Batch) -> bool:
    """A known path lost its content: if a copy of that content was met earlier in the run, the
    stored image moves to the copy's path (re-encoded, as its row is rewritten) and True is returned."""
    copy = state.copies.pop(old[3], None)
    if copy is None:
        return False
    _rewrite(batch, state, old[0], *copy)
    state.count("duplicates", -1)  # the copy is now the stored image itself
    state.count("updated")
    return True


def _rewrite(batch: _Batch, state: _State, image_id: int, values: dict[str, Any], inputs: list[np.ndarray]) -> None:
    """The stored image ``image_id`` is now the file ``values`` describes: its row is rewritten and re-encoded."""
    batch.changed.append({"id": image_id, **values})
    _queue(batch, state, image_id, inputs, values["sha256"])
    state.path_of[image_id] = values["path"]


def _queue(
    batch: _Batch, state: _State, key: int | str, inputs: list[np.ndarray], sha256: str, missing_only: bool = False
) -> None:
    """Queue an image for encoding by every model (``missing_only``: by those whose index lacks it)."""
    for n, target in enumerate(state.targets):
        if isinstance(key, int):
            if missing_only and key in target.indexed:
                continue
            target.indexed.add(key)  # queued counts as indexed: never queue one image twice
        batch.keys[n].append(key)
        batch.inputs[n].append(inputs[n])
        batch.sampled[n].append(novelty.chosen(sha256, target.rate))


class _Progress:
    """The run's bar, with duplicates and failures counted on it (the CLI lists the failures after it)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = bar(total, "indexing", enabled=enabled)
        self.shown = (0, 0)

    def update(self, report: IndexReport) -> None:
        self.bar.update(1)
        counts = (report.duplicates, len(report.failed))
        if counts != self.shown:  # set_postfix redraws: only when a count changed
            self.shown = counts
            self.bar.set_postfix(duplicates=counts[0], failed=counts[1], refresh=False)

    def close(self) -> None:
        self.bar.close()


def _missing(store: Store, data: str, files: list[FileInfo]) -> list[str]:
    """Indexed files under the folder ``data`` that the scan did not find and that are gone from disk
    (a file still there but unreadable, or hidden now, is not missing)."""
    root = Path(data).resolve()
    if not root.is_dir():
        return []
    seen = {f.path for f in files}
    return sorted(p for p in store.paths_under(str(root)) if p not in seen and not os.path.lexists(p))
