"""``embedsearch check``: does everything stored agree with everything else?

- every index entry has its image row and a well-formed vector, and the model's FAISS file holds
  exactly those vectors (no missing, no orphan, no stale ones);
- every image row is in at least one model's index;
- every model's checkpoint matches the sha256 recorded when it was made;
- every stored upload or generated image matches its sha256, and no stored file lacks its row.

``repair`` mends what can be mended from what is stored: it rebuilds index files from the database,
re-encodes vectors that are damaged, drops orphans, and says what it did. A checkpoint that does
not match cannot be mended here: the model must be retrained.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from embedsearch.core.index_cache import IndexCache
from embedsearch.core.layout import OWNED, Layout
from embedsearch.core.models import ModelRegistry
from embedsearch.core.schema import Model
from embedsearch.core.store import Store
from embedsearch.core.vectors import VectorIndex
from embedsearch.data.images import decode_file
from embedsearch.errors import EmbedSearchError, ImageError
from embedsearch.files import file_sha256
from embedsearch.results import CheckReport, ModelCheck

log = logging.getLogger(__name__)


class Checker:
    """Checks (and repairs) a library under the writer lock, so no writer changes it half-way."""

    def __init__(
        self, store: Store, layout: Layout, cache: IndexCache, registry: ModelRegistry, max_pixels: int
    ) -> None:
        self.store = store
        self.layout = layout
        self.cache = cache
        self.registry = registry
        self.max_pixels = max_pixels

    def check(self, repair: bool = False) -> CheckReport:
        report = CheckReport()
        with self.cache.writing():  # a consistent snapshot
            for model in self.store.models():
                self._check_model(model, report, repair)
            self._check_images(report, repair)
        if repair and report.repaired:  # verify the repair: ok only if a fresh check finds nothing left
            again = self.check(repair=False)
            report.ok, report.problems, report.notes = again.ok, again.problems, again.notes
        return report

    def _entries(self, model: Model) -> tuple[dict[int, np.ndarray], list[int]]:
        """image id -> vector of a model's entries, and the image ids whose stored vector is damaged."""
        good, bad = {}, []
        for image_id, blob in self.store.entry_blobs(model.id):
            vec = np.frombuffer(blob, dtype=np.float32) if len(blob) == 4 * model.dim else None
            if vec is None or not np.isfinite(vec).all():
                bad.append(image_id)
            else:
                good[image_id] = vec
        return good, bad

    def _check_model(self, model: Model, report: CheckReport, repair: bool) -> None:
        name = model.name
        result = report.models.setdefault(name, ModelCheck())
        try:
            self.registry.forget(name)  # verify the checkpoint afresh, not a cached encoder
            self.registry.encoder(name)
        except EmbedSearchError as exc:
            result.checkpoint = str(exc)
            report.problem(f"model {name!r}: {exc}")
        stored, bad = self._entries(model)
        # The file on disk, not the cache's copy: the file is what the next process will load.
        on_disk = VectorIndex.load(self.layout.index_path(name), model.dim, model.metric)
        behind = not on_disk.in_step(self.store, model.id)
        if behind:
            report.notes.append(
                f"model {name!r}: index file is behind the database; it catches up when next "
                "opened (or now, with --repair)"
            )
        on_disk.sync(self.store, model.id)  # what an open catches up on is fine; what remains is not
        in_file = on_disk.vectors()
        result.entries, result.vectors_in_file, result.bad_vectors = len(stored) + len(bad), len(in_file), len(bad)
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
        if repair and (missing or orphans or stale or bad or behind):
            self._repair_model(model, bad, report)

    def _repair_model(self, model: Model, bad: list[int], report: CheckReport) -> None:
        name = model.name
        if bad:
            encoder = self.registry.encoder(name)
            rows = self.store.images(bad)
            fixed: list[tuple[int | str, bytes]] = []
            dropped = []
            for image_id in bad:
                row = rows.get(image_id)
                try:
                    pixels = decode_file(row.path, encoder.spec, self.max_pixels)[1] if row and row.path else None
                except ImageError:
                    pixels = None
                if pixels is None:
                    dropped.append(image_id)
                else:
                    fixed.append((image_id, encoder.encode(pixels[None])[0].tobytes()))
            self.store.write_batch(model.id, [], [], fixed)
            if dropped:
                self.store.delete_entries(model.id, dropped)
            report.repaired.append(
                f"model {name!r}: re-encoded {len(fixed)} damaged vectors, dropped {len(dropped)} "
                "whose image could not be read"
            )
        size = self.cache.rebuild(model)  # saved when the check's writing block ends
        report.repaired.append(f"model {name!r}: rebuilt its index file from the database ({size} vectors)")

    def _check_images(self, report: CheckReport, repair: bool) -> None:
        unindexed = self.store.unindexed_image_ids()
        if unindexed:
            report.problem(f"{len(unindexed)} images are in no model's index (e.g. image {unindexed[0]})")
            if repair:
                self.store.delete_images(unindexed)
                self.cache.remove_images(unindexed)
                report.repaired.append(f"dropped {len(unindexed)} image rows that no index used")
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
        for sub in OWNED:
            folder = self.layout.home / sub
            for file in folder.rglob("*") if folder.is_dir() else []:
                if file.is_file() and file.resolve() not in owned and not file.name.startswith("."):
                    report.problem(f"{file}: stored file without an image row")
                    if repair:
                        file.unlink()
                        report.repaired.append(f"deleted {file}, which no image row named")
