"""Shared fixtures: small real images made in code, and fresh libraries."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from embedsearch.data.synth import make_shapes


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise_image(seed: int, size: int = 16, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)


@pytest.fixture(scope="session")
def shapes_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, per_class=6, size=32, seed=1)
    return root


@pytest.fixture
def shapes(tmp_path: Path, shapes_master: Path) -> Path:
    """A private copy (tests modify it) of a labelled folder: 8 shape classes x 6 images, 32x32 RGB."""
    import shutil

    dest = tmp_path / "data"
    shutil.copytree(shapes_master, dest)
    return dest


@pytest.fixture
def engine(tmp_path: Path):
    from embedsearch.engine import Engine

    with Engine(tmp_path / "home") as eng:
        yield eng


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """uvicorn on a free loopback port in a thread (service and browser tests)."""
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
