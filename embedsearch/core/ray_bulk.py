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

import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
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
        raise ExtraNotInstalledError(f"working on Ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


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
) -> Iterator[Decoded]:
    """``files`` decoded and encoded by every ``(encoder, view)`` on Ray, in order, as they are consumed.

    ``workers``: Ray actors, one CPU each (default: the cluster's CPUs). Each good item carries
    ``codes`` (one per encoder) instead of ``views``; failures come as a local run reports them.
    """
    if not files:
        return
    ray = ray_module()
    started = _connect(ray, options)
    try:
        yield from _stream(ray, files, encoders, specs, max_pixels, options, workers)
    except ray.exceptions.RayError as exc:
        raise ClusterError(f"a Ray worker failed: {_first_line(exc)}; what was committed is kept, run again") from None
    finally:
        if started:  # a Ray this run started ends with it; one the caller started is theirs
            ray.shutdown()


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
    ray: ModuleType,
    files: list[FileInfo],
    encoders: list[tuple[Encoder, int]],
    specs: list[InputSpec],
    max_pixels: int,
    options: RayOptions,
    workers: int | None,
) -> Iterator[Decoded]:
    """Chunks round-robin over the actors, results in order, at most AHEAD calls per actor in flight."""
    size = options.chunk
    chunks = [files[i : i + size] for i in range(0, len(files), size)]
    count = min(workers or max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))), len(chunks))
    # Not restarted: a lost worker fails the run; its committed batches are kept and a re-run goes on.
    actor_class = ray.remote(num_cpus=1, max_restarts=0)(EncodeFiles)
    models = ray.put(encoders)  # once for all the actors, not once per actor
    actors = [actor_class.remote(models, specs, max_pixels) for _ in range(count)]
    pending: deque[Any] = deque()
    try:
        for n, part in enumerate(chunks):
            pending.append(actors[n % count].encode.remote(part))
            if len(pending) >= AHEAD * count:
                yield from ray.get(pending.popleft())
        while pending:
            yield from ray.get(pending.popleft())
    finally:  # also when the driver stops early: on a shared cluster the actors would linger
        for actor in actors:
            ray.kill(actor)


def shard_runner(options: RayOptions) -> shards.Runner:
    """Sharded index building's jobs (:mod:`embedsearch.core.shards`) as Ray tasks, one CPU each."""

    def run(jobs: Sequence[shards.Job]) -> list[bytes]:
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
