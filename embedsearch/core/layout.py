"""Where a library keeps things, and the one lock its writers take.

A library home holds ``library.db`` (metadata, unless ``--db`` names another database),
``indexes/<model>.faiss`` (+ ``.faiss.json``, a cache of the model's vectors), ``models/<name>/``
(config.json and weights), ``uploads/`` and ``generated/`` (files the library itself stored, named
by content hash), ``thumbs/`` (a cache of small pictures, named by content hash and size; see
:mod:`embedsearch.core.thumbs`) and ``library.lock``. Writers hold that lock; readers never wait for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from embedsearch.errors import LockedError

log = logging.getLogger(__name__)

LOCK_TIMEOUT = 600.0
#: Folders of files the library wrote itself; everything else belongs to the user.
OWNED = ("uploads", "generated")
#: The thumbnail cache: ``thumbs/<sha[:2]>/<sha>-<size>.webp``, rebuilt on demand, never the only copy.
THUMBS = "thumbs"
FORMATS = {  # Pillow format -> (file ending, content type)
    "PNG": (".png", "image/png"),
    "JPEG": (".jpg", "image/jpeg"),
    "MPO": (".jpg", "image/jpeg"),
    "WEBP": (".webp", "image/webp"),
    "GIF": (".gif", "image/gif"),
    "BMP": (".bmp", "image/bmp"),
    "TIFF": (".tif", "image/tiff"),
    "HEIF": (".heic", "image/heif"),  # read only with the heic extra (pillow-heif)
    "AVIF": (".avif", "image/avif"),  # read only by a Pillow built with libavif
}


class Layout:
    """Paths inside a library home."""

    def __init__(self, home: Path) -> None:
        self.home = home

    @property
    def database(self) -> Path:
        return self.home / "library.db"

    def model_dir(self, name: str) -> Path:
        return self.home / "models" / name

    def index_path(self, name: str) -> Path:
        return self.home / "indexes" / f"{name}.faiss"

    def index_files(self, name: str) -> tuple[Path, Path]:
        path = self.index_path(name)
        return path, path.with_suffix(".faiss.json")

    def stored_path(self, sha256: str, fmt: str, folder: str = "uploads") -> Path:
        return self.home / folder / sha256[:2] / f"{sha256}{FORMATS.get(fmt, ('.img', ''))[0]}"

    def thumb_path(self, sha256: str, size: int) -> Path:
        return self.home / THUMBS / sha256[:2] / f"{sha256}-{size}.webp"

    def delete_thumbnails(self, sha256: str) -> None:
        """Delete the cached thumbnails of one content hash (every size), and their folder if empty."""
        folder = self.home / THUMBS / sha256[:2]
        with contextlib.suppress(OSError):  # a cache: what is left here, 'check --repair' removes
            for file in folder.glob(f"{sha256}-*.webp") if folder.is_dir() else []:
                file.unlink(missing_ok=True)
            folder.rmdir()  # only if empty

    def owns(self, path: str | Path) -> bool:
        """True for files the library itself wrote (uploads, generated images), never user folders."""
        resolved = Path(path).resolve()
        return any(resolved.is_relative_to(self.home / sub) for sub in OWNED)

    def delete_stored(self, path: str | Path) -> None:
        """Delete a file the library stored, and the content-hash folder it leaves empty."""
        file = Path(path)
        if not self.owns(file):
            return
        file.unlink(missing_ok=True)
        folder = file.parent
        if folder.parent.name in OWNED and folder.parent.parent == self.home:
            with contextlib.suppress(OSError):  # only if empty: other images may share the folder
                folder.rmdir()


class WriterLock:
    """The library's writer lock: one process writes at a time; re-entrant within a thread.

    One FileLock object per opened library counts its holds, so an operation that must decide and
    write atomically can call others that lock too.
    """

    def __init__(self, path: Path, timeout: float = LOCK_TIMEOUT, inner: Any = None) -> None:
        """``inner``: a lock with FileLock's interface to take instead of the file at ``path`` (the
        database's own, for a PostgreSQL library shared by several machines)."""
        self.path = path
        self.timeout = timeout
        # Threads of this process queue on _threads first, so the file lock is only ever contended by
        # another process (and only then is "another process is writing" true). thread_local: the
        # thread that holds _threads holds the file through its own descriptor.
        self._threads = threading.Lock()
        self._lock = inner if inner is not None else FileLock(str(path), thread_local=True)
        self._local = threading.local()

    @property
    def held(self) -> bool:
        """True while this thread holds the lock."""
        return self.depth > 0

    @property
    def depth(self) -> int:
        return len(self._holds())

    @property
    def usable(self) -> bool:
        """False if the lock file cannot be made or written: the home does not exist yet (reads must
        not create it) or this user cannot write the library (another user's, a read-only disk)."""
        if not os.access(self.path.parent, os.W_OK):
            return False
        return not self.path.exists() or os.access(self.path, os.W_OK)

    def _holds(self) -> list[bool]:
        """This thread's holds, innermost last: True where the hold took the file lock."""
        holds: list[bool] | None = getattr(self._local, "holds", None)
        if holds is None:
            holds = self._local.holds = []
        return holds

    def try_acquire(self) -> bool:
        if not self.usable:
            return False  # a reader's opportunistic save: nothing is written, nothing created
        first = not self._owns_threads()
        if first and not self._threads.acquire(blocking=False):
            return False
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            if first:
                self._threads.release()
            return False
        self._local.threads = True
        self._holds().append(True)
        return True

    def acquire(self) -> None:
        if not self.usable:
            # No one in this process can write such a library (each write fails with its own error),
            # so there is no writer to exclude: a reader's consistent snapshot (check) goes ahead.
            self._holds().append(False)
            return
        if self._owns_threads():
            self._lock.acquire()  # re-entrant: this thread holds it already
            self._holds().append(True)
            return
        deadline = time.monotonic() + self.timeout
        if not self._threads.acquire(timeout=self.timeout):
            raise LockedError(f"{self.path.parent} is busy with another write of this process; try again later")
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            log.warning("another process is writing to %s; waiting up to %.0f s", self.path.parent, self.timeout)
            try:
                self._lock.acquire(timeout=max(deadline - time.monotonic(), 0))
            except Timeout:
                self._threads.release()
                raise LockedError(
                    f"{self.path.parent} is still being written by another process; try again later"
                ) from None
        self._local.threads = True
        self._holds().append(True)

    def release(self) -> None:
        if self._holds().pop():
            self._lock.release()
            if not any(self._holds()):
                self._local.threads = False
                self._threads.release()

    def _owns_threads(self) -> bool:
        return bool(getattr(self._local, "threads", False))

    @contextmanager
    def hold(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()
