"""What tests call: tiny images made in code, and a live server. Tests import this module;
``conftest.py`` only holds fixtures (and uses these helpers too)."""

from __future__ import annotations

import io
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from embedsearch.engine import Engine


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    """``image`` encoded as ``fmt`` (PNG unless told), in memory."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise_image(seed: int, size: int = 16, mode: str = "RGB") -> Image.Image:
    """A ``size`` x ``size`` picture of uniform noise, a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)


def shape_file(data: Path, shape: str = "circle", i: int = 0) -> bytes:
    """The bytes of the ``i``-th picture of ``shape`` in a folder written by ``make_shapes``."""
    return (data / shape / f"{shape}-{i:04d}.png").read_bytes()


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """uvicorn on a free loopback port in a thread (service and browser tests); yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def weights_file(home: Path, model: str) -> Path:
    """The weights file of a library's model (in its versioned folder ``models/<name>/v-<time>/``)."""
    [weights] = (home / "models" / model).glob("v-*/weights.safetensors")
    return weights


def reader_command(*args: str) -> list[str]:
    """``args`` run so that file permissions hold even for root (CI runs as root): root's
    capabilities dropped with setpriv. Raises pytest's skip where that is not possible."""
    import os
    import shutil

    import pytest

    if os.geteuid() != 0:
        return list(args)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permissions cannot be made to hold")
    return [setpriv, "--inh-caps=-all", "--bounding-set=-all", *args]


@contextmanager
def read_only_mount(folder: Path) -> Iterator[None]:
    """``folder`` read-only for everyone, root included (a read-only bind mount); skips if not allowed."""
    import subprocess

    import pytest

    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.decode().strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only: {ro.stderr.decode().strip()}")
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextmanager
def small_disk(folder: Path, megabytes: int) -> Iterator[None]:
    """A tmpfs of ``megabytes`` mounted on ``folder`` (a disk that fills up); skips if not allowed.

    :func:`grow_disk` gives it more room later, as a user freeing space would.
    """
    import subprocess

    import pytest

    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def grow_disk(folder: Path, megabytes: int) -> None:
    """Give the tmpfs on ``folder`` (from :func:`small_disk`) ``megabytes`` in all."""
    import subprocess

    subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(folder)], check=True)


def fill_disk(folder: Path, spare: int = 0) -> Path:
    """Write a file in ``folder`` until its file system is full, then give back ``spare`` bytes; returns the
    file (delete it to free space)."""
    import errno

    filler = folder / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 16))
                fh.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    os.truncate(filler, max(0, filler.stat().st_size - spare))
    return filler


# -- tiny training sets (test_nn, test_augment) ------------------------------------------------------


def shapes(n: int, size: int, channels: int, seed: int = 0, binary: bool = False) -> np.ndarray:
    """(n, size, size, channels) uint8: a bright square or disc on a faint gradient (binary: on black)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        r = int(rng.integers(size // 6, size // 3))
        cy, cx = rng.integers(r, size - r, size=2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if i % 2 else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        if not binary:
            out[i] = (xx * (40 / size)).astype(np.uint8)[..., None]  # faint left-to-right gradient
        out[i][mask] = 255 if binary else rng.integers(180, 256, size=channels)
    return out


def fit(cls: type, images: np.ndarray, workdir: Path, **options: object) -> Any:
    """A tiny AE or VAE (``cls``: AEEncoder or VAEEncoder) trained on ``images``: 2 epochs, latent 8."""
    from embedsearch.data.images import InputSpec  # here: helpers must not import the package's models

    spec = InputSpec(images.shape[1], images.shape[3])
    settings = {"latent_dim": 8, "epochs": 2, "batch_size": 8, "val_fraction": 0.25, **options}
    return cls.fit(images, spec, cls.Options(**settings), workdir)


def photo_jpeg(seed: int, size: tuple[int, int] = (2000, 1500), orientation: int | None = None) -> bytes:
    """A photo-like JPEG (quality 90): a smooth colour field, detail at every scale down to about 1/100
    of the width (what a thumbnail still shows), and sensor-like noise; fast to make.

    The noise is one 256-pixel tile repeated: it costs the encoder and decoder what noise costs, at a
    fraction of the time to generate it. ``orientation``: an EXIF orientation tag to record.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.zeros((height, width, 3), np.int16)
    for cells, amplitude in ((4, 255), (24, 90), (120, 50)):  # coarse colour field, shapes, texture
        field = rng.integers(0, amplitude + 1, (max(1, cells * height // width), cells, 3), dtype=np.uint8)
        pixels += np.asarray(Image.fromarray(field).resize(size, Image.Resampling.BICUBIC), np.int16)
    tile = rng.integers(-12, 13, (256, 256, 3), dtype=np.int16)
    pixels += np.tile(tile, (-(-height // 256), -(-width // 256), 1))[:height, :width]
    pixels = np.clip(pixels - 90, 0, 255).astype(np.uint8)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    return png_bytes(Image.fromarray(pixels), "JPEG", quality=90, exif=exif.tobytes())


#: True once every tile of both result columns has its picture (the browser test and benchmarks/thumbs.py).
TILES_PAINTED = """n => {
  const imgs = [...document.querySelectorAll('.result img')];
  if (imgs.length < n || !imgs.every(i => i.complete && i.naturalWidth > 0)) return false;
  window.__painted = window.__painted || performance.now();
  return true;
}"""


def results_page_costs(page: Any, url: str, query: Path, k: int) -> tuple[int, float, list[str]]:
    """Open the page on ``url`` (a fresh Playwright page), search with ``query`` through it for ``k``
    results per column, and wait until every tile (2 k) has painted: (response bytes of the page load
    and the search, headers included; seconds from choosing the file to the last tile painted; the
    tiles' image URLs). With one model, both columns show the same ``k`` images: ``k`` thumbnails.

    Bytes are what the browser fetched from the service (the page's own blob: preview is no transfer).
    """
    responses: list[Any] = []
    page.on("requestfinished", lambda request: responses.append(request))
    page.goto(url)
    page.locator("body[data-ready=true]").wait_for()
    page.fill("#k", str(k))
    page.evaluate("() => { window.__chosen = performance.now(); }")
    page.set_input_files("#file", str(query))
    page.wait_for_function(TILES_PAINTED, arg=2 * k, polling="raf")
    seconds = page.evaluate("() => (window.__painted - window.__chosen) / 1000")
    page.wait_for_load_state("networkidle")  # the last requestfinished events are in
    sizes = [r.sizes() for r in responses if r.url.startswith(url)]
    transferred = sum(s["responseBodySize"] + s["responseHeadersSize"] for s in sizes)
    sources = page.eval_on_selector_all(".result img", "imgs => imgs.map(i => i.getAttribute('src'))")
    return transferred, seconds, sources


class PostgresUnavailable(Exception):  # noqa: N818  (a reason to skip, not an error of the product)
    """Why no PostgreSQL server could be started for the tests."""


@contextmanager
def postgres_server(folder: Path) -> Iterator[str]:
    """A throw-away PostgreSQL cluster in ``folder`` on a Unix socket there (no TCP port), its URL.

    Debian's server binaries (package postgresql); initdb refuses to run as root, so as root the
    cluster belongs to the postgres user and runs through runuser. fsync is off: the data is thrown
    away, and crash tests kill our processes, never the server. Raises PostgresUnavailable.
    """
    import glob
    import shutil
    import subprocess

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    pg_ctl = found[-1] if found else shutil.which("pg_ctl")
    if pg_ctl is None:
        raise PostgresUnavailable("no PostgreSQL server binaries (Debian: apt-get install postgresql)")
    bindir = Path(pg_ctl).parent
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root without runuser: cannot start initdb as postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    folder.chmod(0o700)
    data, log = folder / "data", folder / "server.log"

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise PostgresUnavailable(f"{Path(cmd[0]).name} failed: {tail[0]}")

    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
    options = f"-k {folder} -c listen_addresses='' -c fsync=off -c max_connections=200"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start")
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={folder}"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=120,
        )


def database_url(server: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``server`` (a URL)."""
    from sqlalchemy.engine import make_url

    return make_url(server).set(database=name).render_as_string(hide_password=False)


def admin_sql(server: str, *statements: str) -> None:
    """Run statements outside a transaction (CREATE / DROP DATABASE) on the server's own database."""
    from sqlalchemy import create_engine, text

    engine = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def vector_library(engine: Engine, n: int, dim: int = 32, seed: int = 0, name: str = "vecs") -> np.ndarray:
    """A model ``name`` of ``n`` seeded random vectors (image rows without files); the vectors, by image id order."""
    engine.open(create=True)
    model = engine.store.add_model(name=name, kind="pca", config={}, dim=dim, metric="l2", image_size=4, channels=1)
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    for start in range(0, n, 2000):
        part = range(start, min(start + 2000, n))
        images = [
            {"path": None, "sha256": f"{seed:08x}{i:056x}", "width": 1, "height": 1, "format": "PNG", "mode": "L"}
            | {"label": None, "bytes": 1, "mtime": None}
            for i in part
        ]
        pairs = [(im["sha256"], x[i].tobytes()) for im, i in zip(images, part, strict=True)]
        engine.store.write_batch({model.id: pairs}, images)
    return x


def index_entries(home: Path) -> int:
    """Index entries committed so far, read beside the running process (0 before the tables exist)."""
    url = os.environ.get("EMBEDSEARCH_DB")  # set by the ``database`` fixture for PostgreSQL
    if url is None:
        try:
            with sqlite3.connect(f"file:{home / 'library.db'}?mode=ro", uri=True, timeout=5) as conn:
                return conn.execute("SELECT count(*) FROM index_entries").fetchone()[0]
        except sqlite3.Error:
            return 0
    if url not in _ENGINES:
        _ENGINES[url] = create_engine(url, poolclass=NullPool)
    try:
        with _ENGINES[url].connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM index_entries")).scalar_one())
    except SQLAlchemyError:
        return 0


_ENGINES: dict[str, Any] = {}


def labelled_pngs(root: Path, n: int, seed: int) -> Path:
    """``n`` seeded 28x28 grey PNGs in ``class<label>/`` folders under ``root``, plus one broken file
    (``bad.png``): the corpus of the kill-and-rerun tests."""
    from embedsearch.data.synth import make_image_array

    images, labels = make_image_array(n, 28, 1, seed=seed)
    for i, (arr, label) in enumerate(zip(images, labels, strict=False)):
        folder = root / f"class{label}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(arr[..., 0], "L").save(folder / f"{i:05d}.png")
    (root / "bad.png").write_text("not an image")
    return root
