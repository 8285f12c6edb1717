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
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import select

from embedsearch.core.models import file_sha256
from embedsearch.core.store import Image, IndexEntry
from embedsearch.core.vectors import VectorIndex
from embedsearch.data.images import decode_file
from embedsearch.errors import EmbedSearchError, ImageError
from embedsearch.results import CheckReport, ModelCheck

if TYPE_CHECKING:
    from embedsearch.engine import Engine

log = logging.getLogger(__name__)


def _entries(engine: Engine, model_id: int, dim: int) -> tuple[dict[int, np.ndarray], list[int]]:
    """image id -> vector of a model's entries, and the image ids whose stored vector is damaged."""
    good, bad = {}, []
    stmt = select(IndexEntry.image_id, IndexEntry.vector).where(IndexEntry.model_id == model_id)
    with engine.store.session() as s:
        for image_id, blob in s.execute(stmt):
            vec = np.frombuffer(blob, dtype=np.float32) if len(blob) == 4 * dim else None
            if vec is None or not np.isfinite(vec).all():
                bad.append(image_id)
            else:
                good[image_id] = vec
    return good, bad


def _file_vectors(index: VectorIndex) -> dict[int, np.ndarray]:
    ids = index.ids()
    if not len(ids):
        return {}
    flat = index.index.index.reconstruct_n(0, len(ids))  # (N, dim), in id-map order
    return dict(zip(ids.tolist(), flat, strict=False))


def _check_model(engine: Engine, name: str, report: CheckReport, repair: bool) -> None:
    model = engine.model(name)
    result = report.models.setdefault(name, ModelCheck())
    try:
        engine._forget(name)
        engine.encoder(name)
    except EmbedSearchError as exc:
        result.checkpoint = str(exc)
        report.problem(f"model {name!r}: {exc}")
    stored, bad = _entries(engine, model.id, model.dim)
    path = engine.index_path(name)
    on_disk = VectorIndex.load(path, model.dim, model.metric) if path.exists() else VectorIndex(model.dim, model.metric)
    behind = len({i for i in stored if i not in set(on_disk.ids().tolist())})
    # The file is a cache with a stamp of the entries it holds; what an open catches up on is fine.
    # What remains after catching up is a real disagreement.
    lagging = on_disk.sync(engine.store, model.id) or behind > 0
    if lagging:
        report.notes.append(
            f"model {name!r}: index file is behind the database; it catches up when next opened (or now, with --repair)"
        )
    in_file = _file_vectors(on_disk)
    result.entries, result.vectors_in_file, result.bad_vectors = len(stored) + len(bad), len(in_file), len(bad)
    missing = [i for i in stored if i not in in_file]
    orphans = [i for i in in_file if i not in stored and i not in bad]
    probe = on_disk._prepare  # cosine indexes hold normalised vectors
    stale = [i for i in stored if i in in_file and not np.allclose(probe(stored[i][None])[0], in_file[i], atol=1e-5)]
    result.missing_from_file, result.orphans_in_file, result.stale_in_file = len(missing), len(orphans), len(stale)
    for what, items in (
        ("entries missing from", missing),
        ("orphan vectors in", orphans),
        ("stale vectors in", stale),
        ("damaged stored vectors of", bad),
    ):
        if items:
            report.problem(f"model {name!r}: {len(items)} {what} the index (e.g. image {items[0]})")
    if repair and (missing or orphans or stale or bad or lagging):
        _repair_model(engine, name, bad, report)


def _repair_model(engine: Engine, name: str, bad: list[int], report: CheckReport) -> None:
    model = engine.model(name)
    if bad:
        encoder = engine.encoder(name)
        rows = engine.store.images(bad)
        fixed: list[tuple[int | str, bytes]] = []
        dropped = []
        for image_id in bad:
            row = rows.get(image_id)
            try:
                pixels = decode_file(row.path, encoder.spec, engine.max_pixels)[1] if row and row.path else None
            except ImageError:
                pixels = None
            if pixels is None:
                dropped.append(image_id)
            else:
                fixed.append((image_id, encoder.encode(pixels[None])[0].tobytes()))
        engine.store.write_batch(model.id, [], [], fixed)
        if dropped:
            with engine.store.session() as s:
                s.execute(
                    IndexEntry.__table__.delete().where(
                        IndexEntry.model_id == model.id, IndexEntry.image_id.in_(dropped)
                    )
                )
        report.repaired.append(
            f"model {name!r}: re-encoded {len(fixed)} damaged vectors, dropped {len(dropped)} "
            "whose image could not be read"
        )
    fresh = VectorIndex(model.dim, model.metric)
    fresh.sync(engine.store, model.id)
    fresh.save(engine.index_path(name))
    engine._forget(name)
    report.repaired.append(f"model {name!r}: rebuilt its index file from the database ({len(fresh)} vectors)")


def _check_images(engine: Engine, report: CheckReport, repair: bool) -> None:
    with engine.store.session() as s:
        unindexed = list(s.scalars(select(Image.id).where(~Image.id.in_(select(IndexEntry.image_id)))))
        rows = list(s.execute(select(Image.id, Image.path, Image.sha256)))
    if unindexed:
        report.problem(f"{len(unindexed)} images are in no model's index (e.g. image {unindexed[0]})")
        if repair:
            engine.store.delete_images(unindexed)
            report.repaired.append(f"dropped {len(unindexed)} image rows that no index used")
    owned: set[Path] = set()
    for image_id, path, digest in rows:
        if not path:
            continue
        file = Path(path)
        if engine.owns(file):
            owned.add(file.resolve())
            if not file.is_file() or file_sha256(file) != digest:
                report.problem(f"image {image_id}: stored file {file} is missing or does not match its sha256")
        elif not file.exists():
            report.notes.append(f"image {image_id}: {file} is no longer on disk (remove it with 'embedsearch remove')")
    for sub in ("uploads", "generated"):
        for file in (engine.home / sub).rglob("*") if (engine.home / sub).is_dir() else []:
            if file.is_file() and file.resolve() not in owned and not file.name.startswith("."):
                report.problem(f"{file}: stored file without an image row")
                if repair:
                    file.unlink()
                    report.repaired.append(f"deleted {file}, which no image row named")


def check(engine: Engine, repair: bool = False) -> CheckReport:
    report = CheckReport()
    with engine.writing():  # a consistent snapshot: no writer may change things half-way through
        for model in engine.store.models():
            _check_model(engine, model.name, report, repair)
        _check_images(engine, report, repair)
    if repair and report.repaired:  # verify the repair: ok only if a fresh check finds nothing left
        again = check(engine, repair=False)
        report.ok, report.problems, report.notes = again.ok, again.problems, again.notes
    return report
