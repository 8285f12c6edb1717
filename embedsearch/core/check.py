"""``embedsearch check``: does everything stored agree with everything else?

- every index entry has its image row and a well-formed vector, and the model's FAISS file holds
  exactly those vectors (no missing, no orphan, no stale ones);
- every image row is in at least one model's index;
- every model's checkpoint matches the sha256 recorded when it was made;
- every stored upload or generated image matches its sha256, and no stored file lacks its row.

``repair`` mends what can be mended from what is stored: it rebuilds index files from the database,
re-encodes vectors that are damaged or missing, moves stored files no row names to ``lost+found/``,
and says what it did (``dry_run``: what it would do). It deletes no image row and no file but
cached thumbnails of content no image has any more (``thumbs/`` is a cache, never a problem). A
checkpoint that does not match cannot be mended here: the model must be retrained.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from embedsearch.core import knn
from embedsearch.core.ann import IndexSpec
from embedsearch.core.index_cache import IndexCache
from embedsearch.core.layout import OWNED, THUMBS, Layout
from embedsearch.core.models import ModelRegistry
from embedsearch.core.reencode import encode_batches
from embedsearch.core.schema import Model
from embedsearch.core.store import Store
from embedsearch.core.vectors import Owner, VectorIndex
from embedsearch.errors import EmbedSearchError
from embedsearch.files import file_sha256
from embedsearch.results import CheckReport, ModelCheck

log = logging.getLogger(__name__)
#: Where repair puts files it will not delete (stored files no row names, folders in an index's place).
LOST = "lost+found"


class RepairRefusedError(EmbedSearchError):
    """Repair would act on a database that does not seem to be this library's."""


class Checker:
    """Checks (and repairs) a library under the writer lock, so no writer changes it half-way.

    Repair never deletes what the user keeps: image rows stay (re-encoded where their vectors are
    missing), and stored files no row names are moved to ``lost+found/``, not unlinked.
    """

    def __init__(
        self, store: Store, layout: Layout, cache: IndexCache, registry: ModelRegistry, max_pixels: int
    ) -> None:
        self.store = store
        self.layout = layout
        self.cache = cache
        self.registry = registry
        self.max_pixels = max_pixels

    def check(self, repair: bool = False, dry_run: bool = False) -> CheckReport:
        """``repair``: mend what can be mended; with ``dry_run``, only list what repair would do."""
        report = CheckReport()
        plan = _Plan(report, dry_run) if repair or dry_run else None
        with self.cache.writing():  # a consistent snapshot
            if plan is not None:
                self._refuse_foreign_database()
            for model in self.store.models():
                self._check_model(model, report, plan)
            self._check_images(report, plan)
            self._check_thumbnails(report, plan)
        if plan is not None and not dry_run and report.repaired:  # ok only if a fresh check finds nothing left
            again = self.check()
            report.ok, report.problems, report.notes = again.ok, again.problems, again.notes
        if plan is not None:
            report.notes += plan.notes
        return report

    def _refuse_foreign_database(self) -> None:
        """A mistyped --db must not make every stored file look like a stray."""
        stored = self._stored_files()
        named = {Path(p).resolve() for _, p, _ in self.store.image_paths() if p and self.layout.owns(p)}
        if len(stored) >= 2 and len(named & stored) < len(stored) / 2:
            raise RepairRefusedError(
                f"the database {self.store.url} names only {len(named & stored)} of the {len(stored)} files "
                f"stored in {self.layout.home}: wrong --db? (repair refused; nothing was changed)"
            )

    def _stored_files(self) -> set[Path]:
        files = set()
        for sub in OWNED:
            folder = self.layout.home / sub
            for file in folder.rglob("*") if folder.is_dir() else []:
                if file.is_file() and not file.name.startswith("."):
                    files.add(file.resolve())
        return files

    def _entries(self, model: Model) -> tuple[dict[int, np.ndarray], list[int]]:
        """image id -> vector of a model's entries, and the image ids whose stored vector is damaged."""
        good, bad = {}, []
        for image_id, blob in self.store.entry_blobs(model.id):
            width = knn.code_bytes(model.dim, model.metric)  # float32 values, or packed bits for hamming
            vec = knn.from_bytes(blob, model.metric, model.dim)[0] if len(blob) == width else None
            if vec is None or not np.isfinite(vec).all():
                bad.append(image_id)
            else:
                good[image_id] = vec
        return good, bad

    def _check_model(self, model: Model, report: CheckReport, plan: _Plan | None) -> None:
        name = model.name
        result = report.models.setdefault(name, ModelCheck())
        try:
            self.registry.forget(name)  # verify the checkpoint afresh, not a cached encoder
            self.registry.encoder(name)
        except EmbedSearchError as exc:
            result.checkpoint = str(exc)
            report.problem(f"model {name!r}: {exc}")
        stored, bad = self._entries(model)
        result.entries, result.bad_vectors = len(stored) + len(bad), len(bad)
        # The file on disk, not the cache's copy: the file is what the next process will load.
        path = self.layout.index_path(name)
        spec = IndexSpec.from_json(model.index_spec)  # a file of another type than the recorded one is corrupt
        on_disk = VectorIndex.load(path, model.dim, model.metric, Owner.of(model), spec)
        if on_disk.problem:
            report.problem(f"model {name!r}: index file {path.name} is corrupt ({on_disk.problem})")
            if plan is not None:
                self._repair_model(model, bad, plan, path if path.is_dir() else None)
            return
        behind = not on_disk.in_step(self.store, model.id)
        if behind:
            report.notes.append(
                f"model {name!r}: index file is behind the database; it catches up when next "
                "opened (or now, with --repair)"
            )
        on_disk.sync(self.store, model.id)  # what an open catches up on is fine; what remains is not
        in_file = on_disk.vectors()
        result.vectors_in_file = len(in_file)
        missing = [i for i in stored if i not in in_file]
        orphans = [i for i in in_file if i not in stored and i not in bad]
        stale = [
            i
            for i in stored
            if i in in_file and not np.allclose(on_disk.prepare(stored[i][None])[0], in_file[i], atol=1e-5)
        ]
        result.missing_from_file, result.orphans_in_file, result.stale_in_file = len(missing), len(orphans), len(stale)
        for what, items in (
            ("entries missing from", missing),
            ("orphan vectors in", orphans),
            ("stale vectors in", stale),
            ("damaged stored vectors of", bad),
        ):
            if items:
                report.problem(f"model {name!r}: {len(items)} {what} the index (e.g. image {items[0]})")
        if plan is not None and (missing or orphans or stale or bad or behind):
            self._repair_model(model, bad, plan)

    def _repair_model(self, model: Model, bad: list[int], plan: _Plan, folder: Path | None = None) -> None:
        name = model.name
        if folder is not None:
            plan.do(f"moved the folder {folder.name} in the index's place to {LOST}/", lambda: self._keep(folder))
        if bad:
            plan.do(
                f"model {name!r}: re-encoded {len(bad)} damaged vectors (a damaged vector whose image "
                "cannot be read is dropped; its image row stays)",
                lambda: self.store.delete_entries(model.id, self._reencode(model, bad)),
            )
        plan.do(f"model {name!r}: rebuilt its index file from the database", lambda: self.cache.rebuild(model))

    def _reencode(self, model: Model, ids: list[int]) -> list[int]:
        """Encode ``ids`` into ``model`` again from their files; the ids whose file cannot be read."""
        encoder = self.registry.encoder(model.name)
        unreadable: list[int] = []
        for part in encode_batches(self.store, encoder, ids, self.max_pixels):
            self.store.write_batch({model.id: part.entries})
            unreadable += part.unreadable
        self.cache.rebuild(model)  # saved when the check's writing block ends
        return unreadable

    def _keep(self, path: Path) -> Path:
        """Move ``path`` (under the home) to lost+found/, keeping its place in the home's tree."""
        target = self.layout.home / LOST / path.resolve().relative_to(self.layout.home)
        while target.exists():
            target = target.with_name(f"{target.name}.{time.time_ns():x}")
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
        log.info("kept %s as %s", path, target)
        return target

    def _check_images(self, report: CheckReport, plan: _Plan | None) -> None:
        unindexed = self.store.unindexed_image_ids()
        if unindexed:
            report.problem(f"{len(unindexed)} images are in no model's index (e.g. image {unindexed[0]})")
            if plan is not None:
                self._plan_reindex(unindexed, plan)
        owned: set[Path] = set()
        for image_id, path, digest in self.store.image_paths():
            if not path:
                continue
            file = Path(path)
            if self.layout.owns(file):
                owned.add(file.resolve())
                if not file.is_file() or file_sha256(file) != digest:
                    report.problem(f"image {image_id}: stored file {file} is missing or does not match its sha256")
            elif not file.exists():
                report.notes.append(
                    f"image {image_id}: {file} is no longer on disk (remove it with 'embedsearch remove')"
                )
        for file in sorted(self._stored_files() - owned):
            report.problem(f"{file}: stored file without an image row")
            if plan is not None:
                plan.do(f"moved {file} (no image row names it) to {LOST}/", partial(self._keep, file))

    def _check_thumbnails(self, report: CheckReport, plan: _Plan | None) -> None:
        """Cached thumbnails of content no image has (and left-over temporary files): a note, removed by repair."""
        folder = self.layout.home / THUMBS
        if not folder.is_dir():
            return
        shas = {digest for _, _, digest in self.store.image_paths()}
        unused = [f for f in folder.glob("*/*") if f.is_file() and f.name.split("-")[0] not in shas]
        if not unused:
            return
        report.notes.append(f"{len(unused)} cached thumbnails show no image of the library any more")
        if plan is not None:
            plan.do(f"removed {len(unused)} cached thumbnails of images no longer in the library",
                    partial(_remove_files, unused))  # fmt: skip

    def _plan_reindex(self, ids: list[int], plan: _Plan) -> None:
        models = self.store.models()
        if not models:
            plan.notes.append("no model to index them into: make one with 'embedsearch index' or 'train'")
            return
        for model in models:
            plan.do(
                f"model {model.name!r}: encoded {len(ids)} images that were in no index",
                partial(self._reencode_into, model, ids, plan.notes),
            )

    def _reencode_into(self, model: Model, ids: list[int], notes: list[str]) -> None:
        unreadable = self._reencode(model, ids)
        if unreadable:
            notes.append(
                f"model {model.name!r}: {len(unreadable)} images could not be read to encode them "
                f"(e.g. image {unreadable[0]}); they are kept: remove them with 'embedsearch remove'"
            )


def _remove_files(files: list[Path]) -> None:
    for file in files:
        file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only if empty: a thumbnail may be being made beside it
            file.parent.rmdir()


class _Plan:
    """What repair does, or with ``dry_run`` only says it would do."""

    def __init__(self, report: CheckReport, dry_run: bool) -> None:
        self.report = report
        self.dry_run = dry_run
        self.notes: list[str] = []  # what repair found out, kept beside the fresh check's notes

    def do(self, what: str, action: Callable[[], object]) -> None:
        if self.dry_run:
            self.report.planned.append(what)
        else:
            action()
            self.report.repaired.append(what)
