"""Reading many files fast: a folder scan compared with the store, then decoding in worker processes.

Only files that are new or changed on disk (size or mtime), or not yet in the model's index, are
read at all; hashing and decoding run in a process pool (Pillow and hashlib are CPU-bound) while
the parent process encodes and commits.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult, Pool

import numpy as np

from embedsearch.data.images import DEFAULT_MAX_PIXELS, FileInfo, ImageMeta, InputSpec, decode_file, scan
from embedsearch.errors import ImageError

log = logging.getLogger(__name__)

#: Below this many files a process pool costs more to start than it saves.
POOL_THRESHOLD = 1500
#: Files per pool task, and how many tasks may be decoded ahead of the consumer: enough to keep the
#: workers busy while the parent encodes and commits a batch, and a bound on memory (Pool.imap would
#: decode a whole folder ahead of a slower consumer: 12 GB for a million 64x64 RGB images).
CHUNK = 128
AHEAD = 32


@dataclass
class Decoded:
    """One file after reading: either ``meta`` and ``pixels`` (S, S, C) uint8, or an error."""

    file: FileInfo
    meta: ImageMeta | None = None
    pixels: np.ndarray | None = None
    error: str | None = None


@dataclass
class Plan:
    """Which scanned files need reading; the rest are unchanged and already indexed."""

    todo: list[FileInfo] = field(default_factory=list)
    unchanged: int = 0
    scanned: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # image files of unreadable formats, by ending


def plan(root: str, known: dict[str, tuple[int, int, float | None, str, bool]]) -> Plan:
    """Compare a scan with ``known`` (path -> id, bytes, mtime, sha, indexed) from the store."""
    out = Plan()
    for info in scan(root, out.skipped):
        out.scanned += 1
        old = known.get(info.path)
        if old is not None and old[4] and old[1] == info.size and old[2] == info.mtime:
            out.unchanged += 1
        else:
            out.todo.append(info)
    return out


def _decode(job: tuple[FileInfo, InputSpec, int]) -> Decoded:
    info, spec, max_pixels = job
    if info.size < 0:
        return Decoded(info, error="cannot read file (not a regular file, or a broken or looping symlink)")
    try:
        meta, pixels = decode_file(info.path, spec, max_pixels)
    except ImageError as exc:
        return Decoded(info, error=exc.reason)
    return Decoded(info, meta, pixels)


def _decode_chunk(files: list[FileInfo], spec: InputSpec, max_pixels: int) -> list[Decoded]:
    return [_decode((f, spec, max_pixels)) for f in files]


def decode_all(
    files: list[FileInfo], spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None
) -> Iterator[Decoded]:
    """Decode ``files`` in order, in a process pool when there are many."""
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if not uses_pool(len(files), workers):
        yield from (_decode((f, spec, max_pixels)) for f in files)
        return
    # fork on Linux: fast, and it does not re-run the caller's __main__ module (spawn does, which
    # breaks scripts without an ``if __name__ == "__main__"`` guard). The children only run Pillow
    # and hashlib, never torch or OpenMP, so a parent with torch's threads forks safely.
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_worker_setup, initargs=(os.getpid(),)) as pool:
        yield from _bounded(pool, files, spec, max_pixels)


def _worker_setup(parent: int) -> None:
    # Ctrl-C reaches the whole process group: the parent stops the run and ends the pool; a worker
    # that took the KeyboardInterrupt itself would only print "Process ForkPoolWorker-1:" noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A parent killed outright (SIGKILL, OOM) cannot end the pool: on Linux the kernel ends the
    # workers with it, instead of leaving them to die on the broken pipe with a traceback each.
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


def uses_pool(count: int, workers: int | None = None) -> bool:
    """Whether :func:`decode_all` decodes ``count`` files in worker processes."""
    workers = workers if workers is not None else (os.cpu_count() or 1)
    return workers > 1 and count >= POOL_THRESHOLD


def _bounded(pool: Pool, files: list[FileInfo], spec: InputSpec, max_pixels: int) -> Iterator[Decoded]:
    """Results in order, with at most AHEAD chunks submitted but not yet consumed."""
    chunks = (files[i : i + CHUNK] for i in range(0, len(files), CHUNK))
    pending: deque[AsyncResult[list[Decoded]]] = deque()
    for part in chunks:
        pending.append(pool.apply_async(_decode_chunk, (part, spec, max_pixels)))
        if len(pending) >= AHEAD:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


def load_folder(
    root: str, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, list[str | None], list[tuple[str, str]]]:
    """Every good image under ``root`` as (N, S, S, C) uint8, their labels, and the failures."""
    files = list(scan(root))
    images: list[np.ndarray] = []
    labels: list[str | None] = []
    failed: list[tuple[str, str]] = []
    for item in decode_all(files, spec, max_pixels):
        if item.error is not None:
            failed.append((item.file.path, item.error))
        else:
            assert item.pixels is not None  # no error: decoded
            images.append(item.pixels)
            labels.append(item.file.label)
    stacked = np.stack(images) if images else np.zeros((0, *spec.shape), np.uint8)
    return stacked, labels, failed
