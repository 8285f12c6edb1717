"""The metadata store: SQLAlchemy 2.0 ORM models and the few queries the engine needs.

The schema belongs to the Alembic migrations in ``migrations/``; :meth:`Store.open` reads the
database's revision first and runs ``upgrade head`` only when it is behind (or, for a write, missing),
so a library is always at the current schema and opening one at it writes nothing.
Vectors are kept here too (one BLOB per index entry): the database is the single source of truth,
and a FAISS file is a cache of it that can always be rebuilt (see ``index.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

from sqlalchemy import (
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, CursorResult, make_url
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from embedsearch.core.schema import Image, IndexEntry, Model, NameText
from embedsearch.errors import (
    DiskFullError,
    EmbedSearchError,
    LockedError,
    NoLibraryError,
    ReadOnlyError,
    StoreError,
    from_os_error,
)
from embedsearch.files import disk_size

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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own transaction handling runs DDL outside transactions, so a kill during a
    # migration would leave half a schema. Let SQLAlchemy emit BEGIN itself (see _sqlite_begin).
    # No journal_mode here: WAL is a property of the file, set once when the schema is made (see
    # _use_wal), so that opening a file that is not a library, only to find so, changes nothing in it.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
    cur.execute("PRAGMA busy_timeout=30000")
    # A bulk run commits thousands of vectors per batch: checkpoint every 64 MB of WAL instead of every
    # 4 MB (measured: 70k 784-d vectors index 10-15% faster), and truncate the WAL back to 64 MB after.
    cur.execute("PRAGMA wal_autocheckpoint=16384")
    cur.execute("PRAGMA journal_size_limit=67108864")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")


def migrations_dir() -> Path:
    """Installed wheels carry the migrations inside the package; a source checkout has them on top."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "migrations"
    return packaged if packaged.is_dir() else package.parent / "migrations"


def alembic_config(connection: Any = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["connection"] = connection
    return cfg


#: pg_advisory_xact_lock key of schema changes: the first 8 bytes of sha256("embedsearch.migrate").
MIGRATE_LOCK_KEY = int.from_bytes(hashlib.sha256(b"embedsearch.migrate").digest()[:8], "big", signed=True)


def upgrade(engine: SAEngine) -> None:
    from alembic import command

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Several processes opening a new library at once would each create the tables (found by
            # tests/test_concurrency.py: "alembic_version already exists"). The lock is held until
            # this transaction commits, and DDL is transactional there: the next process to get it
            # finds the schema made and has nothing to do.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATE_LOCK_KEY})
        command.upgrade(alembic_config(conn), "head")


@lru_cache(maxsize=1)
def head_revision() -> str | None:
    """The newest schema revision this version of embedsearch knows."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: SAEngine) -> str | None:
    """The database's schema revision, read without writing anything; None: no embedsearch schema."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def sqlite_file(url: str) -> str | None:
    """The file of a SQLite URL (None for other databases, in-memory ones and ``file:`` URIs)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"cannot use database URL {url!r}: {exc}") from None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return None if parsed.database.startswith("file:") else parsed.database


def _connect_read_only(path: str) -> sqlite3.Connection:
    """A read-only connection to a database in a folder this user cannot write."""
    uri = f"file:{quote(path)}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        conn.execute("PRAGMA schema_version")  # WAL needs a -shm file: fails if none exists and none can be made
        return conn
    except sqlite3.OperationalError:
        # immutable: no locks, no WAL, the main file only. What a writer (the owner) commits while this
        # reader runs may not be seen; nothing that was checkpointed is missed.
        return sqlite3.connect(uri + "&immutable=1", uri=True, check_same_thread=False)


def make_engine(url: str, read_only: bool = False) -> SAEngine:
    """An SQLAlchemy engine for ``url``; ``read_only`` (SQLite files only): connections never write."""
    path = sqlite_file(url)
    try:
        if read_only and path is not None:
            engine = create_engine(url, creator=partial(_connect_read_only, path))
        else:
            engine = create_engine(url)
    except ImportError as exc:  # the driver of a server database is an extra
        hint = "; install it with: pip install 'embedsearch[postgres]'" if url.startswith("postgres") else ""
        raise StoreError(f"cannot use database URL {_hidden(url)}: {exc}{hint}") from None
    except (SQLAlchemyError, ValueError) as exc:
        raise StoreError(f"cannot use database URL {_hidden(url)}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


#: pg_advisory_lock key of the library's writer lock on PostgreSQL (advisory locks are per database).
WRITER_LOCK_KEY = int.from_bytes(hashlib.sha256(b"embedsearch.writer").digest()[:8], "big", signed=True)


class AdvisoryLock:
    """The writer lock of a library whose database is PostgreSQL: a session advisory lock held on a
    connection of its own, so that writers on several machines (each with its own home) exclude
    each other. FileLock's interface (``acquire(timeout)``, ``release``, re-entrant), which
    :class:`~embedsearch.core.layout.WriterLock` uses in place of the home's lock file.
    """

    POLL = 0.05  # seconds between tries while another writer holds it

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: SAEngine | None = None
        self._conn: Connection | None = None
        self._count = 0

    def acquire(self, timeout: float = -1) -> None:
        from filelock import Timeout

        if self._count:
            self._count += 1
            return
        if self._engine is None:
            self._engine = create_engine(self.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        query = text("SELECT pg_try_advisory_lock(:key)")
        try:
            conn = self._engine.connect()
        except SQLAlchemyError as exc:  # the server is down or refuses us: one line, not a traceback
            raise self._failed(exc) from None
        try:
            while not conn.execute(query, {"key": WRITER_LOCK_KEY}).scalar_one():
                if deadline is not None and time.monotonic() >= deadline:
                    raise Timeout(_hidden(self.url))
                time.sleep(self.POLL)
        except SQLAlchemyError as exc:
            conn.close()
            raise self._failed(exc) from None
        except BaseException:  # Timeout, Ctrl-C: the connection (and any lock it got) goes with it
            conn.close()
            raise
        self._conn, self._count = conn, 1

    def _failed(self, exc: SQLAlchemyError) -> StoreError:
        return StoreError(f"cannot take the writer lock of {_hidden(self.url)}: {getattr(exc, 'orig', None) or exc}")

    def release(self) -> None:
        self._count -= 1
        if self._count or self._conn is None:
            return
        conn, self._conn = self._conn, None
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": WRITER_LOCK_KEY})
        finally:
            conn.close()  # ends the session: the server drops the lock even if the unlock failed


def writer_lock_for(url: str) -> AdvisoryLock | None:
    """The database's own writer lock where it has one (PostgreSQL); None: use the home's lock file."""
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        return None  # the store reports a bad URL itself
    return AdvisoryLock(url) if backend == "postgresql" else None


def _hidden(url: str) -> str:
    """A URL as it may be shown: its password replaced by ***."""
    try:
        return repr(make_url(url).render_as_string(hide_password=True))
    except ArgumentError:
        return repr(url)


def _migration_lock(url: str) -> Any:
    """Processes opening one new SQLite library at once must not both create its tables.

    Taken only when the schema needs creating or upgrading: a library at the newest schema is opened
    without it, so readers of a library they cannot write never need to make the lock file.
    """
    from contextlib import nullcontext

    from filelock import FileLock

    path = sqlite_file(url)
    if path is None:
        return nullcontext()  # PostgreSQL: upgrade() takes an advisory lock in its transaction
    return FileLock(path + ".migrate.lock", timeout=120)


#: Page size of a new SQLite library. Vectors are blobs of 128 bytes (32-d) to 48 kB (64x64x3
#: pixels); a 784-d one (3 kB) fills a default 4 kB page alone. Measured writing 20k of them in
#: batches of 2,000: 0.73 s and 78 MB at 4 kB, 0.49 s and 56 MB at 16 kB.
SQLITE_PAGE_SIZE = 16384


def _use_wal(engine: SAEngine) -> None:
    """Put a SQLite file in WAL mode (readers never wait for the writer); it stays so. A new, empty
    file gets its page size first (it can only be set before the first table, and not in WAL mode)."""
    if engine.dialect.name != "sqlite":
        return
    raw = engine.raw_connection()  # outside any transaction: the mode cannot change inside one
    try:
        cursor = raw.cursor()
        if cursor.execute("PRAGMA page_count").fetchone()[0] == 0:
            cursor.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        raw.close()


def _no_space_for(url: str) -> bool:
    """Whether a SQLite database's folder has (next to) no free space left."""
    path = sqlite_file(url)
    if path is None:
        return False
    try:
        return shutil.disk_usage(os.path.dirname(path) or ".").free < 1 << 20
    except OSError:
        return False


def _writable(path: str) -> bool:
    return os.access(path, os.W_OK) and os.access(os.path.dirname(path) or ".", os.W_OK)


def database_error(exc: SQLAlchemyError) -> EmbedSearchError:
    """The package error for a failed statement: a full disk and a read-only file get their own."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig)
    if "database or disk is full" in text or "No space left" in text:
        return DiskFullError(f"disk full while writing the database ({text})")
    if "readonly database" in text or "read-only" in text:
        return ReadOnlyError(f"the database cannot be written here ({text}); reading it works")
    return StoreError(f"database error: {text}")


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
            read_only = path is not None and os.path.exists(path) and not _writable(path)
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
            with _migration_lock(self.url):
                _use_wal(engine)
                upgrade(engine)
        except SQLAlchemyError as exc:
            reason = f"{getattr(exc, 'orig', None) or exc}"
            if _no_space_for(self.url):  # SQLite says "disk I/O error" when it cannot make its -wal/-shm files
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
        """One transaction: committed on success, rolled back on any error."""
        if self._sessions is None:
            self.open()
        assert self._sessions is not None  # open() sets it or raises
        with self._sessions() as session:
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
            with self.engine.connect() as conn:
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
                ids = _insert_images(s.connection(), new_images)
            for model_id, given in entries.items():
                pairs = [_triple(entry) for entry in given]
                resolved = [(ids[key] if isinstance(key, str) else key, vec, score) for key, vec, score in pairs]
                if not resolved:
                    continue
                known = [key for key, _, _ in pairs if not isinstance(key, str)]
                if known:  # a new image has no entries to replace
                    s.execute(delete(IndexEntry).where(IndexEntry.model_id == model_id, IndexEntry.image_id.in_(known)))
                _insert_entries(s.connection(), [(model_id, i, v, n) for i, v, n in resolved])
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


#: Positional markers of the DB-API paramstyles :func:`_insert_entries` can write by hand.
_MARKS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


def _insert_entries(conn: Connection, rows: list[tuple[int, int, bytes, float | None]]) -> None:
    """INSERT (model_id, image_id, vector, novelty) rows with the driver's own executemany.

    Measured on a bulk run of 20k 784-d vectors: SQLAlchemy's per-row parameter processing cost 3x
    what SQLite itself spent inserting; these columns need none of it (ints, bytes, floats or NULL).
    """
    _executemany(conn, cast(Table, IndexEntry.__table__), ("model_id", "image_id", "vector", "novelty"), rows)


#: The image columns a bulk run writes; added_at and generated are filled in once per batch.
_IMAGE_COLUMNS = ("path", "sha256", "width", "height", "format", "mode", "label", "bytes", "mtime")
_COLUMN_SET = frozenset(_IMAGE_COLUMNS)


def _insert_images(conn: Connection, images: Sequence[dict[str, Any]]) -> dict[str, int]:
    """INSERT new image rows with the driver's own executemany -> sha256 -> id of each.

    SQLAlchemy's INSERT ... RETURNING processed every row's parameters in Python (a quarter of a
    20k-PNG run's database time); here only the names pass through their column type (the file
    system's names are stored losslessly), and the ids are read back afterwards: every new row's
    id is above the largest id before the insert, and sha256 is unique, so the rows with these
    shas above it are exactly these images.
    """
    table = cast(Table, Image.__table__)
    dialect = conn.dialect
    plain = all(v.keys() == _COLUMN_SET for v in images)  # generated images carry provenance too: few, portable way
    if not plain or _MARKS.get(dialect.paramstyle) is None:  # or a driver with named or numeric markers
        return dict(conn.execute(insert(table).returning(Image.sha256, Image.id), list(images)).all())
    name = NameText()
    added_at = _bound(table.c.added_at.type, dialect, datetime.now(UTC))  # one instant for the batch's rows
    generated = _bound(table.c.generated.type, dialect, False)
    rows = [
        (
            name.process_bind_param(v["path"], dialect),
            v["sha256"],
            v["width"],
            v["height"],
            v["format"],
            v["mode"],
            name.process_bind_param(v["label"], dialect),
            v["bytes"],
            v["mtime"],
            added_at,
            generated,
        )
        for v in images
    ]
    before = conn.execute(select(func.max(Image.id))).scalar() or 0
    _executemany(conn, table, (*_IMAGE_COLUMNS, "added_at", "generated"), rows)
    wanted = {v["sha256"] for v in images}
    found = conn.execute(select(Image.sha256, Image.id).where(Image.id > before)).all()
    return {sha: int(i) for sha, i in found if sha in wanted}


def _bound(kind: Any, dialect: Any, value: Any) -> Any:
    """``value`` as the driver takes it for a column of type ``kind`` (what SQLAlchemy would send)."""
    process = kind.dialect_impl(dialect).bind_processor(dialect)  # the dialect's type (SQLite's DATETIME: text)
    return value if process is None else process(value)


def _executemany(conn: Connection, table: Table, names: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    """INSERT ``rows`` (driver-ready values, in ``names``' order) into ``table`` in one executemany."""
    mark = _MARKS.get(conn.dialect.paramstyle)
    if mark is None:  # a driver with named or numeric markers: the portable way
        conn.execute(insert(table), [dict(zip(names, row, strict=True)) for row in rows])
        return
    quote = conn.dialect.identifier_preparer
    columns = ", ".join(quote.quote(c) for c in names)
    sql = f"INSERT INTO {quote.format_table(table)} ({columns}) VALUES ({', '.join([mark] * len(names))})"
    conn.exec_driver_sql(sql, rows)  # a list of tuples: executemany
