"""The metadata store: SQLAlchemy 2.0 ORM models and the few queries the engine needs.

The schema belongs to the Alembic migrations in ``migrations/``; :meth:`Store.open` reads the
database's revision first and runs ``upgrade head`` only when it is behind (or, for a write, missing),
so a library is always at the current schema and opening one at it writes nothing.
Vectors are kept here too (one BLOB per index entry): the database is the single source of truth,
and a FAISS file is a cache of it that can always be rebuilt (see ``index.py``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    Table,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import CursorResult, make_url
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from embedsearch.core.database import (
    current_revision,
    database_error,
    head_revision,
    insert_entries,
    insert_images,
    make_engine,
    migration_lock,
    no_space_for,
    sqlite_file,
    upgrade,
    use_wal,
    writable,
)
from embedsearch.core.schema import Image, IndexEntry, Model
from embedsearch.errors import (
    DiskFullError,
    LockedError,
    NoLibraryError,
    ReadOnlyError,
    StoreError,
    from_os_error,
)
from embedsearch.files import disk_size
from embedsearch.interrupts import deferred

log = logging.getLogger(__name__)

#: One index entry to write: (image id, vector bytes, novelty or None).
Entry = tuple[int, bytes, float | None]
#: What the writers take: an entry, or (image, vector bytes) for one without novelty; the image is
#: named by id or, for an image the same batch inserts, by its sha256.
EntryIn = tuple[int | str, bytes] | tuple[int | str, bytes, float | None]


def _triple(entry: EntryIn) -> tuple[int | str, bytes, float | None]:
    return entry if len(entry) == 3 else (entry[0], entry[1], None)


_BY_JSON_IDS = select(Image.id, Image.path, Image.label).where(
    Image.id.in_(select(text("value")).select_from(text("json_each(:ids)")))
)


class Store:
    """Typed access to the metadata database.

    ``create=True`` (the default) opens it at once, creating or upgrading the schema as needed.
    ``create=False`` opens it on first use and never creates it: a database that does not exist, or
    has no embedsearch schema, raises :class:`NoLibraryError` until :meth:`open` with ``create=True``
    (a write) makes it. A SQLite file in a folder this user cannot write is opened read-only.
    """

    def __init__(self, url: str, create: bool = True) -> None:
        self.url = url
        self.read_only = False
        self._engine: SAEngine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._opening = threading.Lock()
        if create:
            self.open(create=True)

    @property
    def engine(self) -> SAEngine:
        if self._engine is None:
            self.open()
        assert self._engine is not None  # open() sets it or raises
        return self._engine

    @property
    def where(self) -> str:
        """The database for messages: its file, or its URL without the password."""
        path = sqlite_file(self.url)
        return path if path is not None else make_url(self.url).render_as_string(hide_password=True)

    def exists(self) -> bool:
        """True if the database exists with an embedsearch schema (opening it if it does)."""
        try:
            self.open()
        except NoLibraryError:
            return False
        return True

    def open(self, create: bool = False) -> None:
        """Connect, and bring the schema to the newest revision; ``create``: make it if missing."""
        with self._opening:
            if self._engine is not None:
                return
            path = sqlite_file(self.url)
            if path is not None and not os.path.exists(path):
                if not create:
                    raise NoLibraryError(path)  # checked before connecting: connecting creates the file
                if not os.path.isdir(os.path.dirname(path) or "."):
                    raise StoreError(f"cannot create the database {path}: its folder does not exist")
            read_only = path is not None and os.path.exists(path) and not writable(path)
            engine = make_engine(self.url, read_only)
            try:
                self._ready(engine, create, read_only)
            except BaseException:
                engine.dispose()
                raise
            self._engine, self.read_only = engine, read_only
            self._sessions = sessionmaker(engine, expire_on_commit=False)

    def _ready(self, engine: SAEngine, create: bool, read_only: bool) -> None:
        from filelock import Timeout

        try:
            current = current_revision(engine)
            if current == head_revision():
                return
            if current is None and not create:
                raise NoLibraryError(self.where)
            if read_only:
                raise ReadOnlyError(
                    f"{self.where}: its schema is older than this embedsearch's and it is read-only here; "
                    "its owner can upgrade it with 'embedsearch db upgrade'"
                )
            with migration_lock(self.url):
                use_wal(engine)
                upgrade(engine)
        except SQLAlchemyError as exc:
            reason = f"{getattr(exc, 'orig', None) or exc}"
            if no_space_for(self.url):  # SQLite says "disk I/O error" when it cannot make its -wal/-shm files
                raise DiskFullError(f"disk full: cannot open the metadata database {self.where} ({reason})") from None
            raise StoreError(f"cannot open the metadata database {self.where}: {reason}") from None
        except Timeout:
            raise LockedError(f"{self.where} is being created or upgraded by another process; try again") from None
        except OSError as exc:  # the migration lock file
            raise from_os_error(exc, f"cannot open the metadata database {self.where}") from None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error; Ctrl-C waits for its end."""
        if self._sessions is None:
            self.open()
        assert self._sessions is not None  # open() sets it or raises
        with deferred(), self._sessions() as session:
            try:
                with session.begin():
                    yield session
            except SQLAlchemyError as exc:
                raise database_error(exc) from None

    # -- models -------------------------------------------------------------------------------
    def models(self) -> list[Model]:
        with self.session() as s:
            return list(s.scalars(select(Model).order_by(Model.name)))

    def model(self, name: str) -> Model | None:
        with self.session() as s:
            return s.scalar(select(Model).where(Model.name == name))

    def add_model(self, **values: Any) -> Model:
        with self.session() as s:
            model = Model(**values)
            s.add(model)
            s.flush()
            return model

    def replace_model(self, name: str, entries: Sequence[EntryIn] = (), **values: Any) -> Model:
        """Create or overwrite a model called ``name``, with its first index ``entries``, in one transaction.

        The old model's entries go with its row, so a kill leaves either the old model whole or the new one.
        """
        with self.session() as s:
            s.execute(delete(Model).where(Model.name == name))
            model = Model(name=name, **values)
            s.add(model)
            s.flush()
            if entries:
                s.execute(
                    insert(cast(Table, IndexEntry.__table__)),
                    [
                        {"model_id": model.id, "image_id": i, "vector": v, "novelty": n}
                        for i, v, n in map(_triple, entries)
                    ],
                )
            return model

    def set_index_spec(self, model_id: int, spec: dict[str, Any] | None) -> None:
        """Record a model's index type, parameters and measured recall (None: flat)."""
        with self.session() as s:
            s.execute(update(Model).where(Model.id == model_id).values(index_spec=spec))

    def delete_model(self, name: str) -> None:
        with self.session() as s:
            s.execute(delete(Model).where(Model.name == name))

    # -- images -------------------------------------------------------------------------------
    def known_files(self, model_id: int) -> dict[str, tuple[int, int, float | None, str, bool]]:
        """path -> (image id, bytes, mtime, sha256, has an entry for this model)."""
        has = select(IndexEntry.image_id).where(IndexEntry.model_id == model_id).scalar_subquery()
        stmt = select(Image.path, Image.id, Image.bytes, Image.mtime, Image.sha256, Image.id.in_(has))
        with self.session() as s:
            known: dict[str, tuple[int, int, float | None, str, bool]] = {}
            for path, image_id, size, mtime, sha, has_entry in s.execute(stmt.where(Image.path.is_not(None))):
                if path is not None:  # excluded by the query; narrows the type
                    known[path] = (image_id, size, mtime, sha, has_entry)
            return known

    def images(self, ids: Sequence[int]) -> dict[int, Image]:
        with self.session() as s:
            return {im.id: im for im in s.scalars(select(Image).where(Image.id.in_(list(ids))))}

    def all_shas_for(self, shas: Sequence[str]) -> dict[str, int]:
        with self.session() as s:
            return dict(s.execute(select(Image.sha256, Image.id).where(Image.sha256.in_(list(shas)))).all())

    def entry_ids_of(self, model_id: int, image_ids: Sequence[int]) -> set[int]:
        """Which of ``image_ids`` have an entry in the model's index."""
        with self.session() as s:
            return set(
                s.scalars(
                    select(IndexEntry.image_id).where(
                        IndexEntry.model_id == model_id, IndexEntry.image_id.in_(list(image_ids))
                    )
                )
            )

    def models_of(self, image_id: int) -> list[str]:
        with self.session() as s:
            stmt = (
                select(Model.name)
                .join(IndexEntry, IndexEntry.model_id == Model.id)
                .where(IndexEntry.image_id == image_id)
                .order_by(Model.name)
            )
            return list(s.scalars(stmt))

    def generated_ids(self) -> set[int]:
        with self.session() as s:
            return set(s.scalars(select(Image.id).where(Image.generated)))

    def labels_paths(self, ids: Sequence[int]) -> dict[int, tuple[str | None, str | None]]:
        """id -> (path, label): the hot path of every query, so plain Core rows, no ORM objects."""
        try:
            with deferred(), self.engine.connect() as conn:
                rows = conn.execute(*self._by_ids_statement(ids))
                return {row[0]: (row[1], row[2]) for row in rows}
        except SQLAlchemyError as exc:
            raise database_error(exc) from None

    def _by_ids_statement(self, ids: Sequence[int]) -> tuple[Any, dict[str, Any]]:
        # On SQLite the ids travel as one JSON parameter: the statement text never changes, so it is
        # compiled once (an IN list is rendered anew for every query, measured at twice the cost).
        if self.engine.dialect.name == "sqlite":
            return _BY_JSON_IDS, {"ids": json.dumps([int(i) for i in ids])}
        return select(Image.id, Image.path, Image.label).where(Image.id.in_(list(ids))), {}

    def image_by_path(self, path: str) -> Image | None:
        with self.session() as s:
            return s.scalar(select(Image).where(Image.path == path))

    def image_ids_where(self, label: str | None = None, under: str | None = None) -> set[int]:
        """Ids of the images with this label and (both given: and) at or under this absolute path."""
        stmt = select(Image.id)
        if label is not None:
            stmt = stmt.where(Image.label == label)
        if under is not None:
            prefix = under.rstrip("/") + "/"
            stmt = stmt.where((Image.path == under) | Image.path.startswith(prefix, autoescape=True))
        with self.session() as s:
            return set(s.scalars(stmt))

    def paths_under(self, path: str) -> list[str]:
        """The paths of the images at or under ``path`` (only the paths: every index run asks)."""
        prefix = path.rstrip("/") + "/"
        with self.session() as s:
            stmt = select(Image.path).where((Image.path == path) | Image.path.startswith(prefix, autoescape=True))
            return [p for p in s.scalars(stmt) if p is not None]

    def images_under(self, path: str) -> list[Image]:
        prefix = path.rstrip("/") + "/"
        with self.session() as s:
            stmt = select(Image).where((Image.path == path) | Image.path.startswith(prefix, autoescape=True))
            return list(s.scalars(stmt))

    def delete_images(self, ids: Sequence[int]) -> int:
        with self.session() as s:
            result = cast(CursorResult[Any], s.execute(delete(Image).where(Image.id.in_(list(ids)))))
            return result.rowcount or 0

    # -- entries ------------------------------------------------------------------------------
    def write_batch(
        self,
        entries: Mapping[int, Sequence[EntryIn]],
        new_images: Sequence[dict[str, Any]] = (),
        changed: Sequence[dict[str, Any]] = (),
        deleted: Sequence[int] = (),
        touched: Sequence[tuple[int, float]] = (),
    ) -> dict[str, int]:
        """Commit one batch: insert new images, update changed ones, (re)write their entries.

        ``entries`` maps a model id to (image, vector, novelty) triples (:data:`EntryIn`), the image
        named by id or, for a new image, by sha256; novelty is None (or left out) for kinds without
        one. Returns sha -> id of the new images. Everything happens in one transaction, so a kill
        leaves all or nothing.
        """
        with self.session() as s:
            ids: dict[str, int] = {}
            if deleted:
                s.execute(delete(Image).where(Image.id.in_(list(deleted))))
            if touched:
                s.execute(update(Image), [{"id": i, "mtime": m} for i, m in touched])
            # Updates first: a new image may take the path or the content a changed one gives up.
            for values in changed:
                image_id = values.pop("id")
                s.execute(update(Image).where(Image.id == image_id).values(**values))
                values["id"] = image_id
                # New content: every model's vector of this image is stale.
                s.execute(delete(IndexEntry).where(IndexEntry.image_id == image_id))
            if new_images:
                # Core inserts (Table, not the ORM class): the ORM's per-row bookkeeping costs more
                # than SQLite itself at thousands of rows per batch.
                ids = insert_images(s.connection(), new_images)
            for model_id, given in entries.items():
                pairs = [_triple(entry) for entry in given]
                resolved = [(ids[key] if isinstance(key, str) else key, vec, score) for key, vec, score in pairs]
                if not resolved:
                    continue
                known = [key for key, _, _ in pairs if not isinstance(key, str)]
                if known:  # a new image has no entries to replace
                    s.execute(delete(IndexEntry).where(IndexEntry.model_id == model_id, IndexEntry.image_id.in_(known)))
                insert_entries(s.connection(), [(model_id, i, v, n) for i, v, n in resolved])
            return ids

    def all_shas(self) -> dict[str, int]:
        with self.session() as s:
            return dict(s.execute(select(Image.sha256, Image.id)).all())

    def entries_after(self, model_id: int, after: int) -> list[tuple[int, int, bytes]]:
        """(entry id, image id, vector) of the entries newer than ``after``."""
        stmt = (
            select(IndexEntry.id, IndexEntry.image_id, IndexEntry.vector)
            .where(IndexEntry.model_id == model_id, IndexEntry.id > after)
            .order_by(IndexEntry.id)
        )
        with self.session() as s:
            return [(entry_id, image_id, vector) for entry_id, image_id, vector in s.execute(stmt)]

    def entry_vectors(self, model_id: int, image_ids: Sequence[int]) -> list[tuple[int, bytes]]:
        with self.session() as s:
            stmt = select(IndexEntry.image_id, IndexEntry.vector).where(
                IndexEntry.model_id == model_id, IndexEntry.image_id.in_(list(image_ids))
            )
            return [(image_id, vector) for image_id, vector in s.execute(stmt)]

    def entry_novelty(self, model_id: int, image_ids: Sequence[int]) -> dict[int, float | None]:
        """image id -> the stored novelty of its entry in the model (None: not measured)."""
        with self.session() as s:
            stmt = select(IndexEntry.image_id, IndexEntry.novelty).where(
                IndexEntry.model_id == model_id, IndexEntry.image_id.in_(list(image_ids))
            )
            return {int(i): None if n is None else float(n) for i, n in s.execute(stmt)}

    def novelties(self, model_id: int) -> list[float]:
        """Every measured novelty of a model's entries (the population a query's is ranked in)."""
        stmt = select(IndexEntry.novelty).where(IndexEntry.model_id == model_id, IndexEntry.novelty.is_not(None))
        with self.session() as s:
            return [float(n) for n in s.scalars(stmt) if n is not None]

    def scored_count(self, model_id: int) -> int:
        """How many of a model's entries have a measured novelty."""
        stmt = select(func.count(IndexEntry.id)).where(IndexEntry.model_id == model_id, IndexEntry.novelty.is_not(None))
        with self.session() as s:
            return int(s.execute(stmt).scalar_one())

    def entry_image_ids(self, model_id: int) -> list[int]:
        with self.session() as s:
            return list(s.scalars(select(IndexEntry.image_id).where(IndexEntry.model_id == model_id)))

    def entry_stamp(self, model_id: int) -> tuple[int, int]:
        """(number of entries, highest entry id) of a model: changes whenever its index does."""
        with self.session() as s:
            count, top = s.execute(
                select(func.count(IndexEntry.id), func.max(IndexEntry.id)).where(IndexEntry.model_id == model_id)
            ).one()
            return int(count), int(top or 0)

    def counts(self) -> dict[str, int]:
        with self.session() as s:
            return {
                "images": s.scalar(select(func.count(Image.id))) or 0,
                "models": s.scalar(select(func.count(Model.id))) or 0,
                "entries": s.scalar(select(func.count(IndexEntry.id))) or 0,
            }

    def size_bytes(self) -> int:
        """What the database takes on disk: the SQLite file and its WAL, or PostgreSQL's own count."""
        path = sqlite_file(self.url)
        if path is not None:
            return disk_size(Path(path)) + disk_size(Path(path + "-wal"))
        if self.engine.dialect.name != "postgresql":
            return 0  # an in-memory SQLite database takes no disk
        with self.session() as s:
            return int(s.scalar(text("SELECT pg_database_size(current_database())")) or 0)

    def entry_counts(self) -> dict[int, int]:
        with self.session() as s:
            rows = s.execute(select(IndexEntry.model_id, func.count()).group_by(IndexEntry.model_id))
            return dict(rows.all())

    # -- consistency checks ---------------------------------------------------------------------
    def entry_blobs(self, model_id: int) -> list[tuple[int, bytes]]:
        """(image id, vector bytes) of every entry of a model, damaged ones included."""
        stmt = select(IndexEntry.image_id, IndexEntry.vector).where(IndexEntry.model_id == model_id)
        with self.session() as s:
            return [(int(i), bytes(v)) for i, v in s.execute(stmt)]

    def delete_entries(self, model_id: int, image_ids: Sequence[int]) -> None:
        with self.session() as s:
            s.execute(
                delete(IndexEntry).where(IndexEntry.model_id == model_id, IndexEntry.image_id.in_(list(image_ids)))
            )

    def unindexed_image_ids(self) -> list[int]:
        """Images that are in no model's index."""
        with self.session() as s:
            return list(s.scalars(select(Image.id).where(~Image.id.in_(select(IndexEntry.image_id)))))

    def image_paths(self) -> list[tuple[int, str | None, str]]:
        """(id, path, sha256) of every image."""
        with self.session() as s:
            return [(int(i), p, h) for i, p, h in s.execute(select(Image.id, Image.path, Image.sha256))]
