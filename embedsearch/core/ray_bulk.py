"""Bulk indexing's executor on a Ray cluster: reading, hashing, decoding and encoding in Ray actors.

The driver scans, plans, routes and commits exactly as a local run (:mod:`embedsearch.core.bulk`);
only the executor differs. The files to read go in chunks to a few Ray actors (one per CPU; each
loads the run's models once), which run the same per-file path as the local pool
(:func:`embedsearch.data.ingest.decode_chunk`), encode the chunk with every model and ship back
each file's metadata and codes (never its pixels). The driver takes the chunks back in scan order,
with a bounded number in flight, so memory stays flat however large the folder.

Ray actors, not Ray Data's ``map_batches``: on the 2-core development machine both ran at about
the same rate once going, but Ray Data took 8 s to its first result where the actors took 1.5 s
(20k 28x28 PNGs, 2026-12-03), and that start-up alone would miss the 0.5x-of-local target. Ray
Data would also pull in pandas and pyarrow; the ``ray`` extra is Ray core only.

Every node reads the files at the paths the driver's scan found: they must be on a shared
filesystem (or object-store mount) at the same path everywhere. Ray itself is an optional extra,
imported only here and only when a run asks for it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.core import shards
from embedsearch.core.novelty import with_novelty
from embedsearch.data.images import FileInfo, InputSpec
from embedsearch.data.ingest import Decoded, decode_chunk
from embedsearch.errors import ClusterError, ExtraNotInstalledError, InvalidArgumentError

if TYPE_CHECKING:
    from embedsearch.encoders.base import Encoder

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'embedsearch[ray]'"
#: Files per actor call: a batch for the encoder, and enough work that Ray's per-call cost vanishes.
CHUNK = 512
#: Calls in flight per actor: each has its next chunk queued while the driver commits.
AHEAD = 4


@dataclass(frozen=True)
class RayOptions:
    """Where a bulk run's workers are: a running cluster's ``address`` ("auto", "ray://head:10001"),
    or None to start Ray on this machine (or use the one this process has started already)."""

    address: str | None = None
    #: Local start only: CPUs Ray may use (default all) and its object store's bytes (default Ray's).
    num_cpus: int | None = None
    object_store_memory: int | None = None
    chunk: int = CHUNK

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise InvalidArgumentError(f"chunk must be at least 1, not {self.chunk}")


def ray_module() -> ModuleType:
    """Ray, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ExtraNotInstalledError(_MISSING) from None
    return ray


def require_ray() -> None:
    """One line saying how to install Ray if it is not installed, without importing it (0.6 s here):
    a bulk run imports it in the thread that starts it."""
    if importlib.util.find_spec("ray") is None:
        raise ExtraNotInstalledError(_MISSING)


_MISSING = f"working on Ray needs Ray, which is not installed: {INSTALL_HINT}"


class EncodeFiles:
    """The actor's class: built once per worker with the run's models, then called per chunk of files."""

    def __init__(self, encoders: list[tuple[Encoder, int]], specs: list[InputSpec], max_pixels: int) -> None:
        self.encoders, self.specs, self.max_pixels = encoders, tuple(specs), max_pixels

    def encode(self, files: list[FileInfo]) -> list[Decoded]:
        """The chunk decoded as a local run decodes it, then each good file's pixels swapped for its codes."""
        items = decode_chunk(files, self.specs, self.max_pixels)
        good = [item for item in items if item.error is None and item.views]
        codes = [_codes(encoder, [item.views[view] for item in good]) for encoder, view in self.encoders]
        for n, item in enumerate(good):
            item.codes, item.views = [c[n] for c in codes], []
        return items


def _codes(encoder: Encoder, pixels: list[np.ndarray]) -> np.ndarray:
    if not pixels:
        return np.zeros((0, encoder.code_width), encoder.code_dtype)
    return with_novelty(*encoder.encode_scored(np.stack(pixels)))  # novelty (AE, VAE) as a last column


def encode_on_ray(
    files: list[FileInfo],
    encoders: list[tuple[Encoder, int]],
    specs: list[InputSpec],
    max_pixels: int,
    options: RayOptions,
    workers: int | None = None,
    start: RayStart | None = None,
) -> Generator[Decoded, None, None]:
    """``files`` decoded and encoded by every ``(encoder, view)`` on Ray, in order, as they are consumed.

    ``workers``: Ray actors, one CPU each (default: the cluster's CPUs). Each good item carries
    ``codes`` (one per encoder) instead of ``views``; failures come as a local run reports them.
    While a local Ray starts, the driver decodes and encodes the first chunks itself (see _stream).
    ``start``: Ray started already, for these ``options`` (by default it starts now).
    """
    if not files:
        return
    start = start or RayStart(options)
    try:
        yield from _stream(start, files, EncodeFiles(encoders, specs, max_pixels), options, workers)
    finally:  # a Ray this run started ends with it, in the background; one the caller started is theirs
        start.close()


class RayStart:
    """Ray started (or joined) in a thread of its own, so that its seconds of start-up overlap the run.

    That thread also shuts a Ray it started down, after :meth:`close`: Ray ties its processes to
    their parent with Linux's ``PR_SET_PDEATHSIG``, which fires when the *thread* that forked them
    ends, so the thread that calls ``ray.init`` must live as long as Ray (and a SIGKILLed driver
    still takes Ray with it, as every thread dies). The driver does not wait for the shutdown;
    the interpreter does, before it exits (the thread is not a daemon): no Ray process outlives it.
    """

    def __init__(self, options: RayOptions) -> None:
        global _last
        settle()  # the Ray an earlier run of this process started must be gone before we look for one
        self.options = options
        self._ready, self._stop = threading.Event(), threading.Event()
        self._ray: ModuleType | None = None
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._own, name="embedsearch-ray", daemon=False)
        self._thread.start()
        _last = self

    def _own(self) -> None:
        started = False
        try:
            self._ray = ray_module()
            started = _connect(self._ray, self.options)
        except Exception as exc:  # whatever it is, get() raises it again in the driver's thread
            self._error = exc
        finally:
            self._ready.set()
        if not started or self._ray is None:
            return
        while not self._stop.wait(0.2):
            if not threading.main_thread().is_alive():  # the driver ended without close(): end Ray too
                break
        self._ray.shutdown()

    @property
    def ready(self) -> bool:
        """Whether get() answers at once."""
        return self._ready.is_set()

    def get(self) -> ModuleType:
        """Ray, connected (waiting for it if need be), or the error that stopped it."""
        self._ready.wait()
        if self._error is not None or self._ray is None:
            raise self._error or ClusterError("Ray did not start; run again")
        return self._ray

    def close(self) -> None:
        """The run is done with Ray: one it started shuts down in its thread, unwaited for."""
        self._stop.set()

    def __enter__(self) -> RayStart:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def join(self) -> None:
        self._thread.join()


_last: RayStart | None = None


def settle() -> None:
    """Wait until a Ray that a bulk run of this process started has shut down (at once if none)."""
    if _last is not None:
        _last.join()


def _connect(ray: ModuleType, options: RayOptions) -> bool:
    """Join the cluster at ``options.address``, or start Ray here; True if this call started it."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if options.address is None:
        kwargs.update(num_cpus=options.num_cpus, object_store_memory=options.object_store_memory)
    try:
        # Workers import embedsearch as this process does on this machine (an editable install or
        # PYTHONPATH), and from each node's own install on a cluster.
        # "local": always a new Ray of this run's own, never one some earlier `ray start` left running.
        ray.init(address=options.address or "local", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at {options.address}" if options.address else "on this machine"
        raise ClusterError(f"cannot start or reach Ray {where}: {_first_line(exc)}") from None
    return True


def _stream(
    start: RayStart, files: list[FileInfo], local: EncodeFiles, options: RayOptions, workers: int | None
) -> Iterator[Decoded]:
    """The files' chunks in scan order: the driver's own while a local Ray starts, then the actors'.

    Who decodes and encodes a chunk changes nothing in the result: a chunk is the same files
    whoever takes it, through the same :class:`EncodeFiles`. The driver does not take chunks
    while it joins a cluster at an address: an address that cannot be reached fails the run
    before anything is committed.
    """
    size = options.chunk
    chunks = deque(files[i : i + size] for i in range(0, len(files), size))
    while chunks and options.address is None and not start.ready:
        yield from local.encode(chunks.popleft())  # as a local run would, committed as it goes
    log.debug("Ray up after the driver's first %d files", len(files) - sum(map(len, chunks)))
    if not chunks:
        return
    ray = start.get()
    try:
        yield from _on_actors(ray, chunks, local, workers)
    except ray.exceptions.RayError as exc:
        raise ClusterError(f"a Ray worker failed: {_first_line(exc)}; what was committed is kept, run again") from None


def _on_actors(
    ray: ModuleType, chunks: deque[list[FileInfo]], local: EncodeFiles, workers: int | None
) -> Iterator[Decoded]:
    """Chunks round-robin over the actors, results in order, at most AHEAD calls per actor in flight.

    Until the actors first answer (their processes start and load the models: half a second
    here) one call each is in flight and the driver takes the next chunks itself, at most
    AHEAD per actor, whose results wait behind the actors' in scan order.
    """
    count = min(workers or max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))), len(chunks))
    # Not restarted: a lost worker fails the run; its committed batches are kept and a re-run goes on.
    actor_class = ray.remote(num_cpus=1, max_restarts=0)(EncodeFiles)
    models = ray.put(local.encoders)  # once for all the actors, not once per actor
    actors = [actor_class.remote(models, list(local.specs), local.max_pixels) for _ in range(count)]
    pending: deque[Any] = deque()  # in scan order: the actors' calls (ObjectRefs), the driver's results (lists)
    calls = in_flight = stolen = 0
    answered = False
    try:
        while chunks or pending:
            while chunks and in_flight < (AHEAD if answered else 1) * count:
                pending.append(actors[calls % count].encode.remote(chunks.popleft()))
                calls, in_flight = calls + 1, in_flight + 1
            head = pending.popleft()
            if isinstance(head, list):
                yield from head
                continue
            if not answered and chunks and len(pending) < AHEAD * count and not ray.wait([head], timeout=0)[0]:
                pending.appendleft(head)
                pending.append(local.encode(chunks.popleft()))  # the actors are still starting
                stolen += 1
                continue
            if not answered:
                log.debug("actors answered; the driver took %d more chunks meanwhile", stolen)
            answered, in_flight = True, in_flight - 1
            yield from ray.get(head)
    finally:  # also when the driver stops early: on a shared cluster the actors would linger
        for actor in actors:
            ray.kill(actor)
        pending.clear()  # no ObjectRef may outlive the run: Ray shuts down in another thread
        del models, actors


def shard_runner(options: RayOptions) -> shards.Runner:
    """Sharded index building's jobs (:mod:`embedsearch.core.shards`) as Ray tasks, one CPU each."""

    def run(jobs: Sequence[shards.Job]) -> list[bytes]:
        settle()
        ray = ray_module()
        started = _connect(ray, options)
        try:
            task = ray.remote(num_cpus=1, max_retries=0)(_add_shard)
            empty = ray.put(jobs[0][0])  # every job's copy of the trained empty index: one object
            return list(ray.get([task.remote(empty, x, positions) for _, x, positions in jobs]))
        except ray.exceptions.RayError as exc:
            raise ClusterError(f"a Ray task failed: {_first_line(exc)}; nothing was changed, run again") from None
        finally:
            if started:
                ray.shutdown()

    return run


def _add_shard(empty: bytes, x: np.ndarray, positions: np.ndarray) -> bytes:
    return shards.add_shard((empty, x, positions))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
