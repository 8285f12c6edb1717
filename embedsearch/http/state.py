"""What the routes share: the engine, the gate in front of it and the access settings.

Its own module so that the app (which builds a :class:`Service`) and the routes (which read it
from ``request.app.state.service``) both import it and not each other.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from embedsearch.data.images import header_pixels
from embedsearch.errors import InvalidArgumentError

if TYPE_CHECKING:
    from embedsearch.engine import Engine

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
#: Requests in progress at once per service process (more get 503): with the upload limit, a bound
#: on what clients can make it hold (32 x 20 MB). A browser opens at most 6 connections to a site,
#: and a page of results asks for 16-50 thumbnails in those.
DEFAULT_MAX_REQUESTS = 32
#: Query images (``POST /api/search``, not stored) with more pixels than this are refused from their
#: header, before decoding. 16 MP holds a 4618x3464 (4:3) photo, more than phones save by default
#: (12 MP), while a model looks at 28-1024 pixels a side: a larger query only costs memory. A PNG
#: cannot be decoded partially, so this is its memory bound: at most 64 MB (RGBA) per decode.
DEFAULT_MAX_QUERY_PIXELS = 16_000_000
#: Images up to this many pixels (from the header) decode at once, without a slot: at most 4 MB
#: each, so even the thread pool full of them stays small, and ordinary queries never queue.
SMALL_PIXELS = 1 << 20
#: ... and uploads of at most this many bytes: only they are read before a slot is held.
SMALL_BYTES = 1 << 20
#: How long a larger image waits for a decode slot before the answer is 503 with Retry-After.
DECODE_WAIT = 1.0
RETRY_AFTER_SECONDS = 2


def default_decodes(processes: int = 1) -> int:
    """One core fewer than the machine has, shared by ``processes`` service processes (at least 1
    each): large decodes never take every core, unless there are as many processes as cores."""
    return max(1, ((os.cpu_count() or 1) - 1) // processes)


class DecodeSlots:
    """At most ``slots`` large images decode at once; small ones (ordinary queries) never wait.

    A request for a large image waits up to ``wait`` seconds for a slot, polling on the event loop
    (no thread is held while it waits), then is answered 503 with ``Retry-After``.
    """

    def __init__(self, slots: int, wait: float = DECODE_WAIT, small_pixels: int = SMALL_PIXELS) -> None:
        if slots < 1:
            raise InvalidArgumentError(f"the number of concurrent decodes must be at least 1, not {slots}")
        self.slots, self.wait, self.small_pixels = slots, wait, small_pixels
        self._free = threading.Semaphore(slots)

    @asynccontextmanager
    async def reading(self, files: Sequence[UploadFile], limit: int) -> AsyncIterator[list[bytes]]:
        """The uploaded files' bytes, for as long as they decode, holding a slot if they are large.

        Small uploads (together at most SMALL_BYTES, and no image over SMALL_PIXELS by its header) are
        read and go ahead. Larger ones wait for a slot in their spooled temporary files and are only
        read once it is held, so that waiting requests keep no bodies in memory. An image over
        ``limit`` needs no slot: decoding refuses it from its header.
        """
        if sum(f.size or 0 for f in files) > SMALL_BYTES or any(f.size is None for f in files):
            async with self.held_pixels(self.small_pixels + 1):
                yield [await f.read() for f in files]
            return
        images = [await f.read() for f in files]
        async with self.held_pixels(max((n for n in map(header_pixels, images) if n <= limit), default=0)):
            yield images

    @asynccontextmanager
    async def held_pixels(self, pixels: int) -> AsyncIterator[None]:
        """Hold a slot while an image of ``pixels`` decodes, if it is large."""
        if pixels <= self.small_pixels:
            yield
            return
        deadline = time.monotonic() + self.wait
        while not self._free.acquire(blocking=False):
            if time.monotonic() >= deadline:
                raise HTTPException(
                    503,
                    "the service is busy decoding other large images; try again shortly or send a smaller image",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            await asyncio.sleep(0.01)
        try:
            yield
        finally:
            self._free.release()


class Gate:
    """Many requests share the engine; the refresher alone may swap its caches.

    Requests :meth:`enter` (or, in a thread, hold :meth:`shared`) and never wait for each other.
    :meth:`try_exclusive` holds new requests back for at most ``timeout`` seconds while it waits for
    running ones; if they do not finish in time it gives up, so a slow upload (waiting for a CLI
    writer's lock) only delays the next refresh, never the searches for long.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False
        self._exclusive = threading.Lock()  # one refresher at a time, even with several apps

    def try_enter(self) -> bool:
        """Enter unless the refresher is closing the gate; never blocks (safe on the event loop)."""
        with self._cond:
            if self._closed:
                return False
            self._active += 1
            return True

    async def enter(self) -> None:
        while not self.try_enter():
            await asyncio.sleep(0.002)

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Blocking form of enter/leave, for threads."""
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            self.leave()

    @contextmanager
    def try_exclusive(self, timeout: float) -> Iterator[bool]:
        """Yield True while no request is inside, or False if that did not happen within ``timeout``."""
        if not self._exclusive.acquire(blocking=False):
            yield False
            return
        try:
            with self._cond:
                self._closed = True
                got = self._cond.wait_for(lambda: self._active == 0, timeout)
                if not got:
                    self._closed = False
                    self._cond.notify_all()
            try:
                yield got
            finally:
                if got:
                    with self._cond:
                        self._closed = False
                        self._cond.notify_all()
        finally:
            self._exclusive.release()


#: One gate per engine: several apps may share an engine (and each runs a refresher).
_GATES: weakref.WeakKeyDictionary[Any, Gate] = weakref.WeakKeyDictionary()
_GATES_LOCK = threading.Lock()


def gate_of(engine: Engine) -> Gate:
    with _GATES_LOCK:
        return _GATES.setdefault(engine, Gate())


@dataclass
class Service:
    """What the routes need: the engine, its gate and the access settings (``app.state.service``)."""

    engine: Engine
    token: str | None = None
    token_for_reads: bool = False
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    owns_engine: bool = False
    max_query_pixels: int = DEFAULT_MAX_QUERY_PIXELS
    decodes: DecodeSlots = field(default_factory=lambda: DecodeSlots(default_decodes()))
    gate: Gate = field(init=False)

    def __post_init__(self) -> None:
        self.gate = gate_of(self.engine)

    def authorize(self, token: str | None, write: bool) -> None:
        """Raise 401 unless ``token`` is the configured one (or this access needs none)."""
        if self.token is None or not (write or self.token_for_reads):
            return
        if token is None or not hmac.compare_digest(token.encode(), self.token.encode()):
            what = "this request" if write else "reading"
            raise HTTPException(
                401,
                f"{what} needs the header 'Authorization: Bearer TOKEN' with the service's token",
                headers={"WWW-Authenticate": "Bearer"},
            )
