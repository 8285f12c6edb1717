"""The database under the store: engines, SQLite's settings, the schema's migrations and the locks.

:class:`embedsearch.core.store.Store` opens its database through these; the Alembic environment
(``migrations/env.py``) runs on the connection :func:`upgrade` hands it. A SQLite library is one
file in WAL mode; PostgreSQL gets advisory locks where SQLite has a lock file beside the database.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

from sqlalchemy import (
    Table,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from embedsearch.core.schema import Image, IndexEntry, NameText
from embedsearch.errors import (
    DiskFullError,
    EmbedSearchError,
    ReadOnlyError,
    StoreError,
)
from embedsearch.interrupts import deferred

log = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own transaction handling runs DDL outside transactions, so a kill during a
    # migration would leave half a schema. Let SQLAlchemy emit BEGIN itself (see _sqlite_begin).
    # No journal_mode here: WAL is a property of the file, set once when the schema is made (see
    # use_wal), so that opening a file that is not a library, only to find so, changes nothing in it.
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

    with deferred(), engine.begin() as conn:  # DDL and the revision stamp: whole or not at all
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
        with deferred():
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


def migration_lock(url: str) -> Any:
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


def use_wal(engine: SAEngine) -> None:
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


def no_space_for(url: str) -> bool:
    """Whether a SQLite database's folder has (next to) no free space left."""
    path = sqlite_file(url)
    if path is None:
        return False
    try:
        return shutil.disk_usage(os.path.dirname(path) or ".").free < 1 << 20
    except OSError:
        return False


def writable(path: str) -> bool:
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


# -- bulk inserts ---------------------------------------------------------------------------------

#: Positional markers of the DB-API paramstyles :func:`_insert_entries` can write by hand.
_MARKS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


def insert_entries(conn: Connection, rows: list[tuple[int, int, bytes, float | None]]) -> None:
    """INSERT (model_id, image_id, vector, novelty) rows with the driver's own executemany.

    Measured on a bulk run of 20k 784-d vectors: SQLAlchemy's per-row parameter processing cost 3x
    what SQLite itself spent inserting; these columns need none of it (ints, bytes, floats or NULL).
    """
    _executemany(conn, cast(Table, IndexEntry.__table__), ("model_id", "image_id", "vector", "novelty"), rows)


#: The image columns a bulk run writes; added_at and generated are filled in once per batch.
_IMAGE_COLUMNS = ("path", "sha256", "width", "height", "format", "mode", "label", "bytes", "mtime")
_COLUMN_SET = frozenset(_IMAGE_COLUMNS)


def insert_images(conn: Connection, images: Sequence[dict[str, Any]]) -> dict[str, int]:
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
