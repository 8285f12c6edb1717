"""Several service processes over one library (``serve --workers N``), and the settings each one gets.

One Python process serves about one core's worth of searches (the GIL), so on a machine with more
cores ``serve`` can start N processes. They share nothing but the library: each opens its own
Engine, writes serialise on the library's writer lock, and each one's refresher picks up the
others' changes within about a second, as it does for a CLI ``index`` run.

Why not uvicorn's own ``workers=N``: its processes accept on one shared socket, and the first to
wake takes every connection that is waiting (measured: 16 keep-alive connections opened at once
all went to one of two processes, which served as much as one worker). Here, on Linux, each process
listens on its own socket bound with ``SO_REUSEPORT`` to the same address, and the kernel spreads
new connections over them; elsewhere they share one socket. The parent binds the sockets (so that a
busy port is one error line before anything starts), starts the processes and hands each its
:class:`ServeConfig` through multiprocessing's pipe: neither the command line nor the environment
of a worker holds the token. The parent stops them on SIGINT, SIGTERM or SIGHUP, replaces one that
dies, and each worker stops by itself if the parent is killed outright.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedsearch.errors import EmbedSearchError, InvalidArgumentError
from embedsearch.http.state import DEFAULT_MAX_QUERY_PIXELS, DEFAULT_MAX_REQUESTS, DEFAULT_MAX_UPLOAD

if TYPE_CHECKING:
    from fastapi import FastAPI

    from embedsearch.engine import Engine

log = logging.getLogger(__name__)

#: How often a worker checks that the ``serve`` process that started it is still there.
PARENT_CHECK_SECONDS = 1.0
#: A worker that ends sooner than this after its start failed to start: restarting it would loop.
STARTUP_SECONDS = 10.0
#: How long stopping waits for a worker to finish its requests and save its indexes before killing it.
STOP_SECONDS = 30.0
#: A worker's exit status when its app could not be built (the library is gone, a bad setting).
STARTUP_FAILURE = 3


@dataclass(frozen=True)
class ServeConfig:
    """Everything a service process needs to build its app: the library, the access settings, limits."""

    home: str
    db: str | None = None
    token: str | None = None
    token_for_reads: bool = False
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    max_query_pixels: int = DEFAULT_MAX_QUERY_PIXELS
    #: Per process: with N workers, up to N x this many large images decode at once on the machine.
    max_decodes: int | None = None
    max_requests: int = DEFAULT_MAX_REQUESTS  # per process
    allowed_hosts: tuple[str, ...] = ()
    log_level: int = logging.INFO


def service_app(config: ServeConfig, engine: Engine | None = None) -> FastAPI:
    """The app for ``config``: over ``engine`` (kept open) or over an Engine of its own, opened now
    (NoLibraryError for a library that is not there) and closed when the app stops."""
    from embedsearch.engine import Engine
    from embedsearch.http.app import create_app

    own = engine is None
    if engine is None:
        engine = Engine(config.home, config.db)
        engine.open()  # a read face: it never starts a library
    return create_app(
        engine,
        close_engine=own,
        token=config.token,
        token_for_reads=config.token_for_reads,
        max_upload_bytes=config.max_upload_bytes,
        max_query_pixels=config.max_query_pixels,
        max_decodes=config.max_decodes,
        max_requests=config.max_requests,
        allowed_hosts=config.allowed_hosts,
    )


# -- the parent -----------------------------------------------------------------------------------

#: Builds a worker's app from its settings, in the worker (a module-level function: it is pickled by name).
AppBuilder = Callable[[ServeConfig], "FastAPI"]


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets listening on host:port, one per worker where the kernel balances them
    (Linux SO_REUSEPORT; only sockets of the same user can join), else one shared by all."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    balanced = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
    sockets: list[socket.socket] = []
    try:
        for _ in range(count if balanced else 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if balanced:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # --port 0: the others join the port the first one got
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise InvalidArgumentError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port"
        ) from None
    return sockets if balanced else sockets * count


class Workers:
    """The worker processes of one ``serve --workers N``: started, replaced when one dies, stopped together."""

    def __init__(self, config: ServeConfig, build: AppBuilder, sockets: list[socket.socket], log_level: str) -> None:
        self.config, self.build, self.sockets, self.log_level = config, build, sockets, log_level
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks copied
        self.processes: list[Any] = [None] * len(sockets)
        self.started = [0.0] * len(sockets)
        self.stop = threading.Event()

    def start(self, i: int) -> None:
        process = self.context.Process(
            target=run_worker,
            args=(self.sockets[i], self.config, self.build, self.log_level),
            name=f"embedsearch-serve-{i + 1}",
        )
        process.start()
        self.processes[i], self.started[i] = process, time.monotonic()

    def run(self) -> None:
        """Serve until a signal says stop; EmbedSearchError if a worker could not start."""
        previous = {sig: signal.signal(sig, lambda *_: self.stop.set()) for sig in _STOP_SIGNALS}
        try:
            for i in range(len(self.sockets)):
                self.start(i)
            while not self.stop.wait(0.5):
                self.replace_ended()
        finally:
            self.stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def replace_ended(self) -> None:
        for i, process in enumerate(self.processes):
            if process.is_alive():
                continue
            code = process.exitcode
            # A clean exit follows a signal, usually one for the whole group (Ctrl+C) that the parent
            # is about to act on too: give it a moment before replacing the worker.
            if self.stop.wait(1.0 if code == 0 else 0.0):
                return
            early = time.monotonic() - self.started[i] < STARTUP_SECONDS
            if code == STARTUP_FAILURE or (code is not None and code > 0 and early):  # not killed: it would fail again
                self.stop.set()
                raise EmbedSearchError(f"service worker {process.pid} could not start (exit status {code}); see above")
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"ended (exit status {code})"
            log.warning("service worker %d %s; starting another", process.pid, how)
            self.start(i)

    def stop_all(self) -> None:
        """SIGTERM to every worker (uvicorn finishes running requests, the app saves its indexes), then wait."""
        running = [p for p in self.processes if p is not None and p.is_alive()]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("service worker %d did not stop within %.0f s; killed", process.pid, STOP_SECONDS)
                process.kill()
                process.join()


_STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


def run_workers(config: ServeConfig, build: AppBuilder, host: str, port: int, count: int, log_level: str) -> None:
    """Serve ``config`` from ``count`` processes on host:port until SIGINT, SIGTERM or SIGHUP."""
    sockets = listening_sockets(host, port, count)
    try:
        Workers(config, build, sockets, log_level).run()
    finally:
        for sock in set(sockets):
            sock.close()


# -- a worker -------------------------------------------------------------------------------------


def run_worker(sock: socket.socket, config: ServeConfig, build: AppBuilder, log_level: str) -> None:
    """One worker process: its own app (and Engine) from ``config``, served by uvicorn on ``sock``."""
    import uvicorn

    stop_with_parent()
    try:
        app = build(config)
    except EmbedSearchError as exc:
        log.error("service worker %d: %s", os.getpid(), exc)
        sys.exit(STARTUP_FAILURE)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])


def stop_with_parent(interval: float = PARENT_CHECK_SECONDS) -> threading.Thread:
    """End this worker (SIGTERM to itself: uvicorn shuts down cleanly) when its parent goes away.

    A parent stopped by a signal stops its workers itself; this covers one killed outright (SIGKILL,
    a crash), which would otherwise leave its workers serving as orphans.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.warning("the serve process %d is gone; worker %d stops", parent, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="embedsearch-parent-watch", daemon=True)
    thread.start()
    return thread
