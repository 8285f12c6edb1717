from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from embedsearch.core.database import alembic_config
from embedsearch.core.store import Store
from embedsearch.errors import StoreError


@pytest.fixture
def url(tmp_path: Path, database: str | None) -> str:
    """A new library's database on each metadata store (conftest.py: ``database``); the tests that
    take it run on both, those that name a SQLite file are about SQLite itself."""
    return database or f"sqlite:///{tmp_path / 'lib.db'}"


def test_migrated_schema_matches_the_orm_models(url: str) -> None:
    """alembic check: autogenerate finds nothing to do after upgrade head (no drift)."""
    from alembic import command

    store = Store(url)
    with store.engine.begin() as conn:
        command.check(alembic_config(conn))


def test_open_is_idempotent_and_creates_the_tables(url: str) -> None:
    Store(url).close()
    store = Store(url)  # second open: upgrade head is a no-op
    tables = set(inspect(store.engine).get_table_names())
    assert {"images", "models", "index_entries", "alembic_version"} <= tables


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'lib.db'}")
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA page_size")).scalar() == 16384  # a new library's


def test_a_library_made_with_small_pages_keeps_them(tmp_path: Path) -> None:
    """The page size of an existing file never changes (SQLite cannot, in WAL mode): it just opens."""
    import sqlite3

    path = tmp_path / "lib.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA page_size=4096")
        conn.execute("CREATE TABLE unrelated (x)")
    store = Store(f"sqlite:///{path}")
    assert store.models() == []
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA page_size")).scalar() == 4096
    store.close()


def test_deleting_an_image_deletes_its_entries(url: str) -> None:
    store = Store(url)
    model = store.add_model(name="m", kind="pixels", config={}, dim=2, metric="l2", image_size=1, channels=1)
    image = {
        "path": "/a.png",
        "sha256": "0" * 64,
        "width": 1,
        "height": 1,
        "format": "PNG",
        "mode": "L",
        "label": None,
        "bytes": 1,
        "mtime": 0.0,
    }
    ids = store.write_batch({model.id: [("0" * 64, b"\0" * 8)]}, [image])
    assert store.entry_stamp(model.id) == (1, 1)
    store.delete_images(list(ids.values()))
    assert store.entry_stamp(model.id)[0] == 0


def test_batch_inserted_images_are_stored_as_the_orm_stores_them(url: str) -> None:
    # write_batch bypasses SQLAlchemy's per-row processing: names, times and flags must still be
    # stored in the columns' own formats, and the ids returned must be the rows' ids.
    from sqlalchemy import select, text

    from embedsearch.core.schema import Image

    store = Store(url)
    model = store.add_model(name="m", kind="pixels", config={}, dim=2, metric="l2", image_size=1, channels=1)
    odd = "/caf\udce9 %s ?.png"  # not UTF-8 on disk (a surrogate escape), and the drivers' markers
    fields = {"width": 1, "height": 1, "format": "PNG", "mode": "L", "bytes": 1, "mtime": 1.5}
    images = [{"path": odd, "sha256": "a" * 64, "label": "\udcff", **fields}]
    images.append({"path": "/b.png", "sha256": "b" * 64, "label": None, **fields})
    ids = store.write_batch({model.id: [(im["sha256"], b"\0" * 8) for im in images]}, images)
    with store.session() as s:
        s.add(Image(path="/orm.png", sha256="c" * 64, label="x", **fields))
        s.flush()
        rows = {r.sha256: r for r in s.scalars(select(Image))}
        raw = dict(s.execute(text("SELECT sha256, added_at FROM images")).all())
        generated = dict(s.execute(text("SELECT sha256, generated FROM images")).all())
    assert {sha: rows[sha].id for sha in ids} == ids
    assert (rows["a" * 64].path, rows["a" * 64].label) == (odd, "\udcff")
    assert rows["b" * 64].label is None and rows["b" * 64].mtime == 1.5
    assert type(raw["a" * 64]) is type(raw["c" * 64]) and len(str(raw["a" * 64])) == len(str(raw["c" * 64]))
    assert generated["a" * 64] == generated["c" * 64] and not rows["a" * 64].generated
    assert abs((rows["a" * 64].added_at - rows["c" * 64].added_at).total_seconds()) < 60
    store.close()


def test_unreadable_database_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "lib.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open the metadata database"):
        Store(f"sqlite:///{bad}")


def test_bad_url_is_a_clear_error() -> None:
    with pytest.raises(StoreError, match="cannot use database URL"):
        Store("nosuchdialect://x")


def test_labels_paths_finds_exactly_the_known_ids(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(url)
    model = store.add_model(name="m", kind="pixels", config={}, dim=2, metric="l2", image_size=1, channels=1)
    images = [
        {
            "path": f"/{i}.png",
            "sha256": f"{i:064d}",
            "width": 1,
            "height": 1,
            "format": "PNG",
            "mode": "L",
            "label": "odd" if i % 2 else None,
            "bytes": 1,
            "mtime": 0.0,
        }
        for i in range(5)
    ]
    ids = store.write_batch({model.id: [(im["sha256"], b"\0" * 8) for im in images]}, images)
    wanted = [ids[f"{1:064d}"], ids[f"{4:064d}"], 999]  # 999: no such image
    expected = {ids[f"{1:064d}"]: ("/1.png", "odd"), ids[f"{4:064d}"]: ("/4.png", None)}
    assert store.labels_paths(wanted) == expected  # SQLite: ids as one JSON parameter
    assert store.labels_paths([]) == {}
    # Any other database: the portable IN list gives the same rows.
    monkeypatch.setattr(store.engine.dialect, "name", "other")
    assert store.labels_paths(wanted) == expected


def test_a_lazy_store_creates_nothing_until_asked(tmp_path: Path) -> None:
    from embedsearch.errors import NoLibraryError

    url = f"sqlite:///{tmp_path / 'lib.db'}"
    store = Store(url, create=False)
    assert not store.exists()
    with pytest.raises(NoLibraryError, match="no library at"):
        store.models()
    assert list(tmp_path.iterdir()) == []
    store.open(create=True)
    assert store.models() == [] and (tmp_path / "lib.db").is_file()


def test_a_database_without_the_schema_is_no_library_for_a_reader(tmp_path: Path) -> None:
    """A server database (or an empty SQLite file) counts as missing until a write migrates it."""
    from embedsearch.errors import NoLibraryError

    (tmp_path / "lib.db").write_bytes(b"")
    url = f"sqlite:///{tmp_path / 'lib.db'}"
    with pytest.raises(NoLibraryError):
        Store(url, create=False).models()
    assert (tmp_path / "lib.db").stat().st_size == 0  # the reader wrote nothing
    assert Store(url).models() == []  # a write (create=True) makes the schema in it


def test_opening_a_library_at_the_newest_schema_takes_no_migration_lock(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lib.db'}"
    Store(url).close()
    (tmp_path / "lib.db.migrate.lock").unlink()
    Store(url).close()
    assert not (tmp_path / "lib.db.migrate.lock").exists()


def test_upgrading_a_library_from_before_the_fit_keeps_its_models_as_they_were(url: str) -> None:
    """Migration 0003: models of the previous head read as pad; a config that says crop (recorded
    there by builds before the column) becomes the column's crop; downgrade drops the column again."""
    from alembic import command
    from sqlalchemy import create_engine

    from embedsearch.core.database import make_engine

    old = create_engine(url)
    with old.begin() as conn:
        command.upgrade(alembic_config(conn), "0002")
        for name, config in (("old", "{}"), ("cropped", '{"fit": "crop"}'), ("nulled", "null")):
            conn.execute(
                text(
                    "INSERT INTO models (name, kind, config, dim, metric, image_size, channels, created_at) "
                    "VALUES (:name, 'pixels', :config, 12, 'l2', 2, 3, '2026-12-01 00:00:00')"
                ),
                {"name": name, "config": config},
            )
    old.dispose()
    store = Store(url)  # opening a library at an older revision upgrades it
    assert {m.name: m.fit for m in store.models()} == {"cropped": "crop", "nulled": "pad", "old": "pad"}
    assert (
        store.add_model(name="new", kind="pixels", config={}, dim=2, metric="l2", image_size=1, channels=1).fit == "pad"
    )
    store.close()
    engine = make_engine(url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0002")
    assert "fit" not in {c["name"] for c in inspect(engine).get_columns("models")}
    engine.dispose()


def test_an_empty_server_database_is_no_library_until_a_write(url: str) -> None:
    """On both stores: a reader of a database without the schema gets NoLibraryError and makes no
    table; a writer (create=True) migrates it."""
    from embedsearch.errors import NoLibraryError

    with pytest.raises(NoLibraryError):
        Store(url, create=False).models()
    probe = Store(url, create=False)
    try:
        assert probe.exists() is False
    finally:
        probe.close()
    store = Store(url)
    assert store.models() == [] and "images" in inspect(store.engine).get_table_names()
    store.close()


@pytest.mark.no_store  # it opens none: the URL fails before any connection
def test_a_postgresql_url_without_its_driver_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    with pytest.raises(StoreError) as caught:
        Store("postgresql+psycopg://someone:secret@db.example/images")
    message = str(caught.value)
    assert "pip install 'embedsearch[postgres]'" in message and "secret" not in message, message


def test_the_writer_lock_of_an_unreachable_postgresql_server_is_one_line(tmp_path: Path) -> None:
    from embedsearch.core.database import AdvisoryLock

    lock = AdvisoryLock(f"postgresql+psycopg://someone:secret@/images?host={tmp_path}")  # no server there
    with pytest.raises(StoreError, match="cannot take the writer lock of") as caught:
        lock.acquire(timeout=1)
    assert "secret" not in str(caught.value)


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_during_a_batch_commit_lets_the_batch_commit_whole(url: str) -> None:
    """SIGINT in the middle of write_batch's bulk insert (on PostgreSQL a pipelined executemany,
    which an interrupt left mid-protocol: "cannot exit pipeline mode while busy"): the transaction
    completes, then the KeyboardInterrupt arrives."""
    import os
    import signal

    from sqlalchemy import event

    store = Store(url)
    model = store.add_model(name="m", kind="pixels", config={}, dim=2, metric="l2", image_size=1, channels=1)
    fields = {"width": 1, "height": 1, "format": "PNG", "mode": "L", "label": None, "bytes": 1, "mtime": 0.0}
    images = [{"path": f"/{i}.png", "sha256": f"{i:064x}", **fields} for i in range(50)]
    sent = []

    def interrupt(*_args: object) -> None:
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    event.listen(store.engine, "before_cursor_execute", interrupt)
    with pytest.raises(KeyboardInterrupt):
        store.write_batch({model.id: [(im["sha256"], b"\0" * 8) for im in images]}, images)
    event.remove(store.engine, "before_cursor_execute", interrupt)
    assert sent and store.entry_stamp(model.id)[0] == 50  # every row of the batch, none lost
    store.close()
