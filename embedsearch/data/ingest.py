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
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult, Pool
from typing import Any

import numpy as np

from embedsearch import interrupts
from embedsearch.data.images import (
    DEFAULT_MAX_PIXELS,
    FileInfo,
    ImageMeta,
    InputSpec,
    decode_bytes_for,
    read_bytes,
    scan,
)
from embedsearch.errors import ImageError
from embedsearch.progress import bar

log = logging.getLogger(__name__)

#: Below this many files (and POOL_BYTES of them) a process pool costs more to start than it saves.
POOL_THRESHOLD = 1500
POOL_BYTES = 32 << 20
#: Files per pool task, and how many tasks may be decoded ahead of the consumer: enough to keep the
#: workers busy while the parent encodes and commits a batch, and a bound on memory (Pool.imap would
#: decode a whole folder ahead of a slower consumer: 12 GB for a million 64x64 RGB images).
CHUNK = 128
AHEAD = 32


@dataclass
class Decoded:
    """One file after reading: either ``meta`` and one ``(S, S, C)`` uint8 array per input spec, or an error.

    A worker that encodes too (a Ray run, :mod:`embedsearch.core.ray_bulk`) ships ``codes`` instead
    of ``views``: one code per model of the run, in the run's order.
    """

    file: FileInfo
    meta: ImageMeta | None = None
    views: list[np.ndarray] = field(default_factory=list)
    error: str | None = None
    codes: list[np.ndarray] = field(default_factory=list)

    @property
    def pixels(self) -> np.ndarray | None:
        """The array of the first (or only) spec."""
        return self.views[0] if self.views else None


@dataclass
class Plan:
    """Which scanned files need reading; the rest are unchanged and already indexed."""

    todo: list[FileInfo] = field(default_factory=list)
    unchanged: int = 0
    scanned: int = 0


def plan(files: Iterable[FileInfo], known: dict[str, tuple[int, int, float | None, str, bool]]) -> Plan:
    """Compare a scan with ``known`` (path -> id, bytes, mtime, sha, indexed) from the store."""
    out = Plan()
    for info in files:
        out.scanned += 1
        old = known.get(info.path)
        if old is not None and old[4] and old[1] == info.size and old[2] == info.mtime:
            out.unchanged += 1
        else:
            out.todo.append(info)
    return out


Specs = tuple[InputSpec, ...]


def _decode(info: FileInfo, specs: Specs, max_pixels: int) -> Decoded:
    if info.size < 0:
        return Decoded(info, error="cannot read file (not a regular file, or a broken or looping symlink)")
    try:
        meta, views = decode_bytes_for(read_bytes(info.path), list(specs), info.path, max_pixels)
    except ImageError as exc:
        return Decoded(info, error=exc.reason)
    return Decoded(info, meta, views)


def decode_chunk(files: list[FileInfo], specs: Specs, max_pixels: int) -> list[Decoded]:
    """Read, hash and decode ``files`` in order (Ray's executor; pool workers run the same ``_decode``)."""
    return [_decode(f, specs, max_pixels) for f in files]


#: A pool worker's answer for one chunk: per spec one ``(n, S, S, C)`` uint8 array of the chunk's
#: files (a failed file's row is zeros), and per file its ImageMeta's fields or its error message.
Packed = tuple[list[np.ndarray], list[tuple[str, int, int, str, str, int] | str]]


#: In a pool worker: the parent's "stop" flag (decode_all), set when it reads no more results.
_STOP: Any = None


def decode_packed(files: list[FileInfo], specs: Specs, max_pixels: int) -> Packed:
    """:func:`decode_chunk` in a form that crosses the process boundary cheaply.

    Pickling a Decoded (with its FileInfo, ImageMeta and one small array per spec) cost about 10 µs
    a file on the two sides of the pipe, as much as decoding a 28x28 PNG; one array per spec and
    plain tuples cost a fraction of it, and the parent already has the FileInfo. Once the parent
    has stopped reading, the rest of the chunk is left out (nobody unpacks it).
    """
    arrays = [np.zeros((len(files), *spec.shape), np.uint8) for spec in specs]  # (n, S, S, C) each
    results: list[tuple[str, int, int, str, str, int] | str] = []
    for n, file in enumerate(files):
        if _STOP is not None and _STOP.value:
            break
        item = _decode(file, specs, max_pixels)
        if item.error is not None or item.meta is None:
            results.append(item.error or "unknown error")
            continue
        for array, view in zip(arrays, item.views, strict=True):
            array[n] = view
        m = item.meta
        results.append((m.sha256, m.width, m.height, m.format, m.mode, m.bytes))
    return arrays, results


def unpack(files: list[FileInfo], packed: Packed) -> Iterator[Decoded]:
    """The Decoded files of :func:`decode_packed`'s answer for ``files`` (views into its arrays)."""
    arrays, results = packed
    for n, (info, result) in enumerate(zip(files, results, strict=True)):
        if isinstance(result, str):
            yield Decoded(info, error=result)
        else:
            yield Decoded(info, ImageMeta(*result), [array[n] for array in arrays])


def decode_all(
    files: list[FileInfo],
    specs: InputSpec | Sequence[InputSpec],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
) -> Generator[Decoded, None, None]:
    """Decode ``files`` in order, each once for all ``specs``, in a process pool when there is much work."""
    specs = (specs,) if isinstance(specs, InputSpec) else tuple(specs)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if not uses_pool(files, workers):
        yield from (_decode(f, specs, max_pixels) for f in files)
        return
    # fork on Linux: fast, and it does not re-run the caller's __main__ module (spawn does, which
    # breaks scripts without an ``if __name__ == "__main__"`` guard). The children only run Pillow
    # and hashlib, never torch or OpenMP, so a parent with torch's threads forks safely.
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    stop = ctx.RawValue("b", 0)  # shared memory, read by the workers without a lock
    pool = ctx.Pool(workers, initializer=_worker_setup, initargs=(os.getpid(), stop))
    try:
        yield from _bounded(pool, files, specs, max_pixels, workers)
    finally:
        _finish(pool, stop)


def _finish(pool: Pool, stop: Any) -> None:
    """End the pool by letting each worker finish the file it is on and exit.

    Pool.terminate() kills the workers wherever they are, and one killed while it sends a result
    leaves the result queue's lock held: terminate() then waits forever on the pool's thread that
    is blocked on that lock (benchmarks/interrupts.py: once in about 100 interrupted runs). Told to stop,
    the workers skip what is left of their chunks, so this takes about one file's decoding.
    """
    stop.value = 1
    pool.close()
    try:
        pool.join()
    except BaseException:  # a second Ctrl-C while waiting: stop at once
        pool.terminate()
        raise


def _worker_setup(parent: int, stop: Any) -> None:
    global _STOP
    _STOP = stop
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


def uses_pool(files: list[FileInfo], workers: int | None = None) -> bool:
    """Whether :func:`decode_all` decodes ``files`` in worker processes: many small files, or a few
    large ones (a hundred 12-megapixel photos take seconds each to read and decode)."""
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers <= 1 or len(files) < 2 * workers:
        return False
    return len(files) >= POOL_THRESHOLD or sum(max(f.size, 0) for f in files) >= POOL_BYTES


def _bounded(pool: Pool, files: list[FileInfo], specs: Specs, max_pixels: int, workers: int) -> Iterator[Decoded]:
    """Results in order, with at most AHEAD chunks submitted but not yet consumed."""
    size = _chunk_size(files, workers)
    chunks = (files[i : i + size] for i in range(0, len(files), size))
    pending: deque[tuple[list[FileInfo], AsyncResult[Packed]]] = deque()
    for part in chunks:
        pending.append((part, pool.apply_async(decode_packed, (part, specs, max_pixels))))
        if len(pending) >= AHEAD:
            part, result = pending.popleft()
            yield from unpack(part, _ready(result))
    while pending:
        part, result = pending.popleft()
        yield from unpack(part, _ready(result))


def _ready(result: AsyncResult[Packed]) -> Packed:
    """A chunk's result; while it is decoded, Ctrl-C in a polled run (:mod:`embedsearch.interrupts`) stops it."""
    while not result.ready():
        result.wait(0.1)
        interrupts.check()
    return result.get()


def _chunk_size(files: list[FileInfo], workers: int) -> int:
    """CHUNK files per task, fewer for large files: each worker gets several tasks to balance."""
    return max(1, min(CHUNK, len(files) // (4 * workers)))


def load_folder(
    root: str, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, list[str | None], list[tuple[str, str]]]:
    """Every good image under ``root`` as (N, S, S, C) uint8, their labels, and the failures."""
    files = list(scan(root))
    images: list[np.ndarray] = []
    labels: list[str | None] = []
    failed: list[tuple[str, str]] = []
    progress = bar(len(files), "decoding")  # a large folder takes minutes before training can start
    for item in decode_all(files, spec, max_pixels):
        progress.update(1)
        if item.error is not None:
            failed.append((item.file.path, item.error))
        else:
            assert item.pixels is not None  # no error: decoded
            images.append(item.pixels)
            labels.append(item.file.label)
    progress.close()
    stacked = np.stack(images) if images else np.zeros((0, *spec.shape), np.uint8)
    return stacked, labels, failed
