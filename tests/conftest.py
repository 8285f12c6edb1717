"""The fixtures: folders of small real images made in code, and libraries built on them.

One family, each fixture building on the one before (helpers that tests call are in ``helpers.py``):

* ``shapes``: a private, writable folder of labelled pictures: 8 shape classes x 6, 32x32 RGB,
  in ``<shape>/<shape>-<i>.png``.
* ``home``: the path of an empty library home (not created yet).
* ``engine``: an open :class:`Engine` on ``home``, nothing in it.
* ``indexed``: ``engine`` with ``shapes`` indexed by the ``pixels`` model (48 images).
* ``library``: ``indexed`` plus a PCA model ``pca`` (8-d) with ``shapes`` indexed, and one upload
  (labelled ``upload``, in both models): 49 images.
* ``library_home``: the same library built and closed; its home path (for the CLI, or to reopen).

Both metadata stores: every test runs twice, on SQLite and on PostgreSQL (``database`` is autouse),
but for those marked ``no_store`` (they never open a library: one run, and opening one fails) or
``sqlite_only`` (about the SQLite file itself):

* ``postgres_server``: the URL of a PostgreSQL server for the whole session:
  ``EMBEDSEARCH_TEST_POSTGRES`` if set, else a cluster started in a temporary folder (Debian's
  postgresql package). Without one the PostgreSQL tests skip, saying why; with
  ``EMBEDSEARCH_REQUIRE_POSTGRES=1`` (as ``.ci/run`` sets) they fail instead.
* ``database``: "sqlite" (each home's own library.db) or a new, empty PostgreSQL database, exported
  as ``EMBEDSEARCH_DB`` so that every engine and CLI subprocess of the test uses it; its value is
  the URL (None for SQLite).
* ``new_database``: makes another empty database on the same store, for a test with several
  libraries: its URL, or None for SQLite (each home has its own library.db).

A trained library, built once per module that asks for it (training is the slow part):

* ``trained_data``: 8 shape classes x 6, 28x28 grey; read it, do not change it.
* ``trained``: an open :class:`Engine` over ``trained_data`` with ``pixels``, an ``ae`` and a ``vae``
  (latent 8, 2 epochs). Tests of one module share it: they assert what holds whatever the others added.
* ``learnt``: (engine, home, held-out shapes): 8 shapes x 20 with an AE and a VAE of 10 epochs, which
  tell shapes from noise (out-of-distribution tests).

Signals: ``sigint_raises`` gives SIGINT Python's default handler for the test (a background
shell may have left it ignored), for tests that interrupt their own process.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from embedsearch.data.synth import make_shapes
from embedsearch.engine import Engine
from embedsearch.results import CheckReport
from helpers import PostgresUnavailable, admin_sql, database_url, noise_image, png_bytes
from helpers import postgres_server as postgres_server_at


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt during the test, as in a terminal: a shell that started pytest
    in the background (as .ci/run may be) leaves SIGINT ignored, and Python keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def repair_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``check --repair`` any test runs (API or CLI, in this process) keeps every image row and file."""
    from embedsearch.core.check import Checker

    original = Checker.check

    def stored(checker: Checker) -> dict[str, bytes]:
        home = checker.layout.home
        folders = [home / sub for sub in ("uploads", "generated", "lost+found")]
        return {f.name: f.read_bytes() for d in folders if d.is_dir() for f in d.rglob("*") if f.is_file()}

    def checked(checker: Checker, repair: bool = False, dry_run: bool = False) -> CheckReport:
        if not repair or dry_run:
            return original(checker, repair, dry_run)
        rows, files = {i for i, _, _ in checker.store.image_paths()}, stored(checker)
        report = original(checker, repair, dry_run)
        assert {i for i, _, _ in checker.store.image_paths()} == rows, "check --repair lost image rows"
        after = stored(checker)
        assert all(after.get(name) == data for name, data in files.items()), "check --repair lost a stored file"
        return report

    monkeypatch.setattr(Checker, "check", checked)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    given = os.environ.get("EMBEDSEARCH_TEST_POSTGRES")
    if given:
        yield given
        return
    # Not under pytest's temporary folder: that is root's alone (0700), where the postgres user cannot go.
    folder = Path(tempfile.mkdtemp(prefix="embedsearch-test-pg-"))
    try:
        with postgres_server_at(folder) as url:
            yield url
    except PostgresUnavailable as exc:
        if os.environ.get("EMBEDSEARCH_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here (EMBEDSEARCH_REQUIRE_POSTGRES=1) but: {exc}")
        pytest.skip(f"no PostgreSQL server: {exc}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


#: What EMBEDSEARCH_DB holds in a test marked ``no_store``: a server that cannot exist, so a test
#: that opens a library after all fails (saying this name) instead of quietly running on SQLite only.
NO_STORE_URL = "postgresql+psycopg://marked-no-store@/this_test_is_marked_no_store?host=/nonexistent"


STORES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.hookimpl(tryfirst=True)  # before the fixtures' own params apply: these replace them
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test runs on both stores, but for those marked ``no_store`` or ``sqlite_only``; a test
    of the module-wide ``trained`` library runs on that library's store (``module_database``)."""
    # As parametrize marks, which pytest lets take precedence over the fixtures' own params.
    mark = metafunc.definition.add_marker
    for marker, only in (("no_store", "none"), ("sqlite_only", "sqlite")):
        if metafunc.definition.get_closest_marker(marker):
            mark(pytest.mark.parametrize("database", [only], indirect=True))
            if only == "sqlite" and "module_database" in metafunc.fixturenames:
                mark(pytest.mark.parametrize("module_database", ["sqlite"], indirect=True))
            return
    if "module_database" in metafunc.fixturenames:
        mark(pytest.mark.parametrize("database", ["module"], indirect=True))


def _new_postgres_database(server: str) -> tuple[str, str]:
    name = f"test_{uuid.uuid4().hex[:16]}"
    admin_sql(server, f'CREATE DATABASE "{name}"')
    return name, database_url(server, name)


@pytest.fixture(scope="module", params=STORES)
def module_database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The store of a library shared by a module's tests (``trained``): None for SQLite, or a URL."""
    if request.param == "sqlite":
        yield None
        return
    server = request.getfixturevalue("postgres_server")
    name, url = _new_postgres_database(server)
    try:
        yield url
    finally:
        admin_sql(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(autouse=True, params=STORES)
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    # A MonkeyPatch of its own: a test's monkeypatch.undo() must not put it back on SQLite.
    with pytest.MonkeyPatch.context() as env:
        if request.param == "module":
            url = request.getfixturevalue("module_database")
            env.setenv("EMBEDSEARCH_DB", url) if url else env.delenv("EMBEDSEARCH_DB", raising=False)
            yield url
        elif request.param in ("sqlite", "none"):
            if request.param == "none":
                env.setenv("EMBEDSEARCH_DB", NO_STORE_URL)
            else:
                env.delenv("EMBEDSEARCH_DB", raising=False)
            yield None
        else:
            server = request.getfixturevalue("postgres_server")
            name, url = _new_postgres_database(server)
            env.setenv("EMBEDSEARCH_DB", url)
            try:
                yield url
            finally:
                admin_sql(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def new_database(database: str | None, request: pytest.FixtureRequest) -> Iterator[Callable[[], str | None]]:
    if database is None:
        yield lambda: None
        return
    server = request.getfixturevalue("postgres_server")
    made: list[str] = []

    def make() -> str:
        name, url = _new_postgres_database(server)
        made.append(name)
        return url

    try:
        yield make
    finally:
        admin_sql(server, *(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in made))


#: Options of the AE and VAE of ``trained``: tiny and quick, latent 8.
TRAINED_OPTIONS = {"epochs": 2, "latent_dim": 8, "batch_size": 16}


@pytest.fixture(scope="session")
def shapes_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pictures ``shapes`` copies (made once per session; never handed to a test to change)."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, per_class=6, size=32, seed=1)
    return root


@pytest.fixture
def shapes(tmp_path: Path, shapes_master: Path) -> Path:
    """A private copy (tests modify it) of a labelled folder: 8 shape classes x 6 images, 32x32 RGB."""
    dest = tmp_path / "data"
    shutil.copytree(shapes_master, dest)
    return dest


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """Where this test's library lives; empty (the Engine or the CLI creates it)."""
    return tmp_path / "home"


@pytest.fixture
def engine(home: Path) -> Iterator[Engine]:
    with Engine(home) as eng:
        yield eng


def _fill_library(engine: Engine, shapes: Path) -> None:
    engine.index(str(shapes), "pixels")
    engine.create_model("pca", "pca", str(shapes), options={"dim": 8})
    engine.index(str(shapes), "pca")
    engine.add_image(png_bytes(noise_image(21, 30)), label="upload")


@pytest.fixture
def indexed(engine: Engine, shapes: Path) -> Engine:
    engine.index(str(shapes), "pixels")
    return engine


@pytest.fixture
def library(engine: Engine, shapes: Path) -> Engine:
    _fill_library(engine, shapes)
    return engine


@pytest.fixture
def library_home(home: Path, shapes: Path) -> Path:
    with Engine(home) as eng:
        _fill_library(eng, shapes)
    return home


@pytest.fixture(scope="module")
def trained_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained-data")
    make_shapes(root, per_class=6, size=28, mode="L")
    return root


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, trained_data: Path, module_database: str | None
) -> Iterator[Engine]:
    with Engine(tmp_path_factory.mktemp("trained") / "home", db=module_database) as eng:
        eng.index(str(trained_data), "pixels", workers=0)
        for kind in ("ae", "vae"):
            eng.create_model(kind, kind, str(trained_data), options=TRAINED_OPTIONS)
            eng.index(str(trained_data), kind, workers=0)
        yield eng


#: An AE and a VAE that have learnt the shapes (the ``trained`` fixture's two epochs have not).
LEARNT = {"epochs": 10, "latent_dim": 8, "batch_size": 16}


@pytest.fixture(scope="module")
def learnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, Path, Path]]:
    """(engine, its home, held-out shapes): 8 shapes x 20, 28x28 grey, with pixels, an AE and a VAE
    that tell shapes from noise (tests of out-of-distribution warnings; mark them ``sqlite_only``)."""
    data, held_out = tmp_path_factory.mktemp("learnt-data"), tmp_path_factory.mktemp("held-out")
    make_shapes(data, per_class=20, size=28, mode="L")
    make_shapes(held_out, per_class=4, size=28, mode="L", seed=5)  # the same kind of shapes, never seen
    home = tmp_path_factory.mktemp("learnt") / "home"
    with Engine(home) as engine:
        engine.index(str(data), "pixels", workers=0)
        for kind in ("ae", "vae"):
            engine.create_model(kind, kind, str(data), options=LEARNT)
            engine.index(str(data), kind, workers=0)
        yield engine, home, held_out


@pytest.fixture
def pillow_decodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[int, int]]]:
    """(format, size) of every image Pillow actually decodes (in any thread), at the size it decodes it."""
    from PIL import ImageFile

    seen: list[tuple[str, tuple[int, int]]] = []
    real = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile):  # type: ignore[no-untyped-def]
        if self.tile:  # not decoded yet
            seen.append((str(self.format), self.size))
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return seen
