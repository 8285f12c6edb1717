"""The metadata store: SQLAlchemy 2.0 ORM models and the few queries the engine needs.

The schema belongs to the Alembic migrations in ``migrations/``; :func:`open_store` runs
``upgrade head`` on the connection it opens, so a library is always at the current schema.
Vectors are kept here too (one BLOB per index entry): the database is the single source of truth,
and a FAISS file is a cache of it that can always be rebuilt (see ``index.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

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
from sqlalchemy.engine import CursorResult
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from embedsearch.core.schema import Image, IndexEntry, Model
from embedsearch.errors import StoreError

log = logging.getLogger(__name__)


_BY_JSON_IDS = select(Image.id, Image.path, Image.label).where(
    Image.id.in_(select(text("value")).select_from(text("json_each(:ids)")))
)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own transaction handling runs DDL outside transactions, so a kill during a
    # migration would leave half a schema. Let SQLAlchemy emit BEGIN itself (see _sqlite_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
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


def upgrade(engine: SAEngine) -> None:
    from alembic import command

    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")


def make_engine(url: str) -> SAEngine:
    try:
        engine = create_engine(url)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreError(f"cannot use database URL {url!r}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _migration_lock(url: str) -> Any:
    """Processes opening one new SQLite library at once must not both create its tables."""
    from contextlib import nullcontext

    from filelock import FileLock
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return nullcontext()  # server databases serialise DDL themselves
    return FileLock(parsed.database + ".migrate.lock", timeout=120)


class Store:
    """Typed access to the metadata database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        try:
            with _migration_lock(url):
                upgrade(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the metadata database {url}: {getattr(exc, 'orig', None) or exc}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error."""
        with self._sessions() as session:
            try:
                with session.begin():
                    yield session
            except SQLAlchemyError as exc:
                raise StoreError(f"database error: {getattr(exc, 'orig', None) or exc}") from None

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

    def replace_model(self, name: str, entries: Sequence[tuple[int, bytes]] = (), **values: Any) -> Model:
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
                    [{"model_id": model.id, "image_id": i, "vector": v} for i, v in entries],
                )
            return model

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
            raise StoreError(f"database error: {getattr(exc, 'orig', None) or exc}") from None

    def _by_ids_statement(self, ids: Sequence[int]) -> tuple[Any, dict[str, Any]]:
        # On SQLite the ids travel as one JSON parameter: the statement text never changes, so it is
        # compiled once (an IN list is rendered anew for every query, measured at twice the cost).
        if self.engine.dialect.name == "sqlite":
            return _BY_JSON_IDS, {"ids": json.dumps([int(i) for i in ids])}
        return select(Image.id, Image.path, Image.label).where(Image.id.in_(list(ids))), {}

    def image_by_path(self, path: str) -> Image | None:
        with self.session() as s:
            return s.scalar(select(Image).where(Image.path == path))

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
        model_id: int,
        new_images: list[dict[str, Any]],
        changed: list[dict[str, Any]],
        entries: list[tuple[int | str, bytes]],
        deleted: Sequence[int] = (),
        touched: Sequence[tuple[int, float]] = (),
    ) -> dict[str, int]:
        """Commit one batch: insert new images, update changed ones, (re)write their entries.

        ``entries`` name their image by id or, for a new image, by sha256. Returns sha -> id of
        the new images. Everything happens in one transaction, so a kill leaves all or nothing.
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
                rows = s.execute(insert(cast(Table, Image.__table__)).returning(Image.sha256, Image.id), new_images)
                ids = dict(rows.all())
            resolved = [(ids[key] if isinstance(key, str) else key, vec) for key, vec in entries]
            s.execute(
                delete(IndexEntry).where(
                    IndexEntry.model_id == model_id, IndexEntry.image_id.in_([i for i, _ in resolved])
                )
            )
            if resolved:
                s.execute(
                    insert(cast(Table, IndexEntry.__table__)),
                    [{"model_id": model_id, "image_id": i, "vector": v} for i, v in resolved],
                )
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
