"""The HTTP service: a FastAPI app over one shared :class:`~embedsearch.engine.Engine`.

``create_app`` builds everything (nothing happens at import time). The routes live in
``service_api.py`` and only parse, call one engine method and render. This module holds what is
around them: the error mapping (package errors -> ``{"error": message}`` with a 4xx status), the
bearer token check, the request-size limit, security headers, and the background refresher that
lets the service see what other processes (a CLI ``index`` run) committed.

Threads: endpoints are plain ``def`` functions, so FastAPI runs them in its thread pool and many
searches run at once. The engine's index cache guards FAISS within the process and holds the
writer lock across processes. New or removed vectors from other processes are synced beside
running searches (each index under its lock), so they show within about a second under any load;
only a model made, replaced or deleted elsewhere needs :meth:`Engine.refresh`, which swaps the
engine's caches while no request is inside the engine (:class:`Gate`). A service that
defers index saves while it runs: the refresher writes changed index files every
``SAVE_SECONDS`` and when the service stops.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedsearch.errors import (
    DataError,
    DiskFullError,
    EmbedSearchError,
    ImageError,
    InvalidArgumentError,
    LockedError,
    ModelError,
    NotFoundError,
    ReadOnlyError,
    StoreError,
    UnknownModelError,
    from_os_error,
)
from embedsearch.http.security import RequestLimit, SiteGuard, allowed_names, public_text
from embedsearch.http.state import (
    DEFAULT_MAX_QUERY_PIXELS,
    DEFAULT_MAX_REQUESTS,
    DEFAULT_MAX_UPLOAD,
    DecodeSlots,
    Service,
    default_decodes,
)
from embedsearch.version import __version__

if TYPE_CHECKING:
    from embedsearch.engine import Engine

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).with_name("web")
REFRESH_SECONDS = 1.0
#: How often a service that defers index saves writes the changed index files.
SAVE_SECONDS = 5.0
#: How long the refresher may hold new requests back while waiting for running ones to finish.
REFRESH_WAIT = 0.05
#: The longest it holds them back, after rounds that found the service too busy.
MAX_REFRESH_WAIT = 1.0
_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_ASSETS = "/docs-assets"
#: The docs pages start Swagger UI and ReDoc with inline scripts: their own policy, still only 'self'.
_DOCS_PATHS = ("/docs", "/redoc")
_DOCS_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


# -- errors ---------------------------------------------------------------------------------------

#: Package error -> HTTP status; the first matching class wins, so subclasses come first.
STATUS: list[tuple[type[EmbedSearchError], int]] = [
    (UnknownModelError, 404),
    (NotFoundError, 404),
    (LockedError, 503),
    (DiskFullError, 507),  # Insufficient Storage: nothing of the request was stored
    (ReadOnlyError, 403),  # the library is served read-only (another user's, a read-only disk)
    (ImageError, 422),
    (InvalidArgumentError, 400),
    (DataError, 400),
    (ModelError, 400),
    (StoreError, 503),
]
_UNSUPPORTED = ("not an image", "not an accepted upload format")


def status_of(exc: EmbedSearchError) -> int:
    if isinstance(exc, ImageError) and any(s in exc.reason for s in _UNSUPPORTED):
        return 415  # decided by the content: Pillow does not know it as an image we take
    return next((code for cls, code in STATUS if isinstance(exc, cls)), 500)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _public(request: Request, message: str) -> str:
    """The message without the server's absolute paths (the log keeps them)."""
    return public_text(message, request.app.state.service.engine.home)


async def _package_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EmbedSearchError)
    status = status_of(exc)
    if status >= 500:
        log.error("%s: %s", type(exc).__name__, exc)
    return _error(status, _public(request, str(exc)), {"Retry-After": "5"} if status == 503 else None)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, _public(request, str(exc.detail)), dict(exc.headers or {}))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return _error(422, "; ".join(parts) or "invalid request")


async def _os_error(request: Request, exc: Exception) -> JSONResponse:
    """An OSError no layer below named (each should): still its own status, never a bare 500 page."""
    assert isinstance(exc, OSError)
    where = f"cannot use {exc.filename}" if exc.filename else "file system error"
    return await _package_error(request, from_os_error(exc, where))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error", exc_info=exc)
    return _error(500, "internal server error (see the service's log)")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(EmbedSearchError, _package_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(OSError, _os_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)


# -- ASGI middleware ------------------------------------------------------------------------------


class _TooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request is larger than the service's limit of {limit:,} bytes")


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes: at once by Content-Length, else while streaming.

    A chunked body is counted as it arrives and cut off at the limit, so nothing unbounded is read.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            bad = not length.isdigit()
            response = _error(400 if bad else 413, "invalid Content-Length" if bad else str(_TooLarge(self.limit)))
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


class SecurityHeaders:
    """nosniff everywhere (uploads are served back), a strict CSP for the page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = scope["path"].startswith(_DOCS_PATHS)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                headers.append((b"content-security-policy", (_DOCS_CSP if docs else _CSP).encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


# -- background work ------------------------------------------------------------------------------


class Refresher(threading.Thread):
    """Warm the models up, then pick up other processes' writes about once a second."""

    def __init__(self, service: Service, interval: float = REFRESH_SECONDS) -> None:
        super().__init__(name="embedsearch-refresh", daemon=True)
        self.service = service
        self.interval = interval
        self.stopped = threading.Event()
        self.next_save = time.monotonic() + SAVE_SECONDS
        self.wait = REFRESH_WAIT

    def run(self) -> None:
        self._warm_up()
        while not self.stopped.wait(self.interval):
            self.refresh_once()

    def refresh_once(self) -> bool:
        engine = self.service.engine
        try:
            got = True
            if engine.models_changed():
                # Swapping models needs no request inside; under load, wait a little longer each round.
                with self.service.gate.try_exclusive(self.wait) as got:
                    if got:
                        engine.refresh()
                self.wait = REFRESH_WAIT if got else min(self.wait * 2, MAX_REFRESH_WAIT)
            else:  # new or removed vectors only: synced under the index lock, beside running searches
                with self.service.gate.shared():
                    engine.refresh_vectors()
            if time.monotonic() >= self.next_save:
                self.next_save = time.monotonic() + SAVE_SECONDS
                engine.flush(wait=False)
            return got
        except Exception:  # keep serving; the next round tries again
            log.warning("refreshing the library failed", exc_info=True)
            return False

    def _warm_up(self) -> None:
        """Load every model's encoder and index now, so that the first search is not slow."""
        engine = self.service.engine
        try:
            names = [m.name for m in engine.store.models()]
        except EmbedSearchError:
            return
        for name in names:
            if self.stopped.is_set():
                return
            try:
                with self.service.gate.shared():
                    engine.encoder(name)
                    engine.vector_index(name)
            except EmbedSearchError as exc:
                log.warning("model %r could not be loaded: %s", name, exc)


# -- the app ----------------------------------------------------------------------------------------


def _open_engine(engine_or_home: Engine | str | os.PathLike[str], close: bool) -> tuple[Engine, bool]:
    from embedsearch.engine import Engine

    if isinstance(engine_or_home, Engine):
        return engine_or_home, close
    return Engine(engine_or_home), True


def create_app(
    engine_or_home: Engine | str | os.PathLike[str],
    token: str | None = None,
    token_for_reads: bool = False,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_query_pixels: int = DEFAULT_MAX_QUERY_PIXELS,
    max_decodes: int | None = None,
    allowed_hosts: Iterable[str] = (),
    close_engine: bool = False,
    max_requests: int = DEFAULT_MAX_REQUESTS,
) -> FastAPI:
    """The service over an open Engine (shared, not closed here unless ``close_engine``) or a library
    home (opened and closed here).

    ``token``: every write (upload, delete, generate with add) needs ``Authorization: Bearer TOKEN``;
    with ``token_for_reads`` every API call but ``/api/health`` does. ``max_upload_bytes`` caps a
    request body (all files and fields of one upload together). ``max_query_pixels`` caps a search
    image (stored uploads keep the library's limit); at most ``max_decodes`` large images (default:
    one per core but one) decode at once, others wait briefly and then get 503 with Retry-After.
    ``allowed_hosts``: Host names answered besides localhost, 127.0.0.1 and ::1 (any port); a write
    whose ``Origin`` is not one of them, or that says ``Sec-Fetch-Site: cross-site``, gets 403.
    ``max_requests``: requests in progress at once; more get 503 with Retry-After.
    """
    from embedsearch.http import generate_routes, library_routes
    from embedsearch.http.explain_routes import router as explain_router
    from embedsearch.http.routes import router

    if max_upload_bytes < 1:
        raise InvalidArgumentError("max_upload_bytes must be at least 1")
    engine, owned = _open_engine(engine_or_home, close_engine)
    # The refresher saves changed index files every SAVE_SECONDS and when the app stops: not one
    # write of a whole index per upload (measured: 43 ms per upload into a 70k index, against 12).
    deferred = engine.defer_index_saves(True)
    if max_query_pixels < 1 or max_requests < 1:
        raise InvalidArgumentError("max_query_pixels and max_requests must be at least 1")
    decodes = DecodeSlots(max_decodes if max_decodes is not None else default_decodes())
    service = Service(engine, token or None, token_for_reads, max_upload_bytes, owned, max_query_pixels, decodes)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        refresher = Refresher(service)
        refresher.start()
        try:
            yield
        finally:
            refresher.stopped.set()
            refresher.join(timeout=10)
            engine.defer_index_saves(deferred)
            if owned:
                engine.close()
            else:
                engine.flush()

    # The docs pages with Swagger UI and ReDoc served from the package, not from a CDN: they work offline.
    app = FastAPIOffline(
        title="embedsearch",
        version=__version__,
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
        description="Image similarity search with autoencoder (AE) and VAE embeddings. "
        'Errors are JSON: {"error": message}. The page is at /.',
    )
    app.state.service = service
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(generate_routes.router)
    app.include_router(library_routes.router)
    app.include_router(explain_router)
    _add_page(app)
    app.add_middleware(BodyLimit, limit=max_upload_bytes)
    app.add_middleware(SiteGuard, allowed=allowed_names(allowed_hosts))  # before anything reads the body
    app.add_middleware(RequestLimit, limit=max_requests)
    app.add_middleware(SecurityHeaders)
    return app


def _add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
