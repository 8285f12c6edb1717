"""Out-of-distribution scores: how unusual a query is for an AE or VAE, as a percentile of the library's.

Entries an AE or VAE writes carry their image's novelty (the reconstruction loss, or the VAE's
negative ELBO; :meth:`embedsearch.encoders.base.DecodingEncoder.novelty`). A query's novelty is
ranked among its model's stored ones: percentile 99.5 means 99.5% of the scored images were
explained at least as well. Above :data:`embedsearch.results.OOD_PERCENTILE` the results carry a
warning. Entries written before novelty was stored have none: the percentile is over those that
do, and a model with none gives None.

The novelty needs a decoder pass, which costs a conv VAE twice its encoder, and a percentile needs
a sample, not every image: a bulk run scores every image while the model holds at most :data:`SAMPLE`
images, and beyond that a share chosen by content (the image's sha256, so the same image is
always chosen or not, locally and on Ray alike) that keeps the sample in proportion to the
library. 5,000 values place the 99th percentile within about 0.14 points (binomial standard error).
Uploads are always scored; a query by id of an image outside the sample has no percentile.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from embedsearch.core.index_cache import IndexCache
from embedsearch.core.schema import Model
from embedsearch.core.store import Store
from embedsearch.encoders.base import DecodingEncoder, Encoder

K = TypeVar("K")

#: Scored images a model should have: all of a library up to this size, a share of a larger one.
SAMPLE = 5000


def sample_rate(scored: int, incoming: int) -> float:
    """The share of a run's ``incoming`` images to score, for a model with ``scored`` already: all
    while the total stays within SAMPLE, then SAMPLE's share of the grown library (a first run of
    20k images scores 5,000; new kinds of images added later are represented in proportion)."""
    return min(1.0, SAMPLE / max(1, scored + incoming))


def chosen(sha256: str, rate: float) -> bool:
    """Whether the image with this content is in a sample of share ``rate`` (uniform in its hash)."""
    return rate >= 1.0 or int(sha256[:8], 16) < rate * 0x1_0000_0000


def entries(keys: Sequence[K], vectors: np.ndarray, scores: np.ndarray | None) -> list[tuple[K, bytes, float | None]]:
    """(key, vector bytes, novelty) rows to store from ``(N, width)`` codes and ``(N,)`` scores (or None;
    NaN for an image that was not scored)."""
    if scores is None:
        return [(key, v.tobytes(), None) for key, v in zip(keys, vectors, strict=True)]
    return [
        (key, v.tobytes(), None if n != n else float(n))  # n != n: NaN
        for key, v, n in zip(keys, vectors, scores.tolist(), strict=True)
    ]


def encode_sampled(encoder: Encoder, images: np.ndarray, sampled: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes of ``(N, S, S, C)`` images and the novelty of those in the ``(N,)`` bool mask ``sampled``
    (NaN for the rest; None if the kind has none or no image is sampled): the decoder runs only on those."""
    if sampled.all() or not isinstance(encoder, DecodingEncoder):
        return encoder.encode_scored(images)
    if not sampled.any():
        return encoder.encode(images), None
    codes = np.empty((len(images), encoder.code_width), encoder.code_dtype)  # (N, width)
    scores = np.full(len(images), np.nan)  # (N,)
    codes[sampled], scores[sampled] = encoder.encode_scored(images[sampled])
    codes[~sampled] = encoder.encode(images[~sampled])
    return codes, scores


def keep_sampled(scores: np.ndarray | None, sampled: np.ndarray) -> np.ndarray | None:
    """Novelties a worker computed for every image, NaN outside the sample (a Ray run stores what a local one does)."""
    return None if scores is None else np.where(sampled, scores, np.nan)


def with_novelty(codes: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
    """Codes for shipping from a worker: ``(N, width)``, or ``(N, width + 1)`` with each novelty last.

    Only kinds with a novelty have one, and their codes are float32: the value rides as one more column.
    """
    return codes if scores is None else np.hstack([codes, scores[:, None].astype(codes.dtype)])


def split_novelty(encoder: Encoder, shipped: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The inverse of :func:`with_novelty` for ``encoder``'s codes: ``(N, width)`` and ``(N,)`` or None."""
    if shipped.shape[1] == encoder.code_width:
        return shipped, None
    return np.ascontiguousarray(shipped[:, :-1]), shipped[:, -1].astype(np.float64)


class NoveltyRanks:
    """Each model's stored novelties, sorted, reloaded only when the model's index has changed.

    The key is the loaded index object and its change counter, so a query costs a binary search,
    never a read of the whole model from the database.
    """

    def __init__(self, store: Store, cache: IndexCache) -> None:
        self.store = store
        self.cache = cache
        self._lock = threading.Lock()
        self._sorted: dict[str, tuple[tuple[int, int, int, int], np.ndarray]] = {}  # name -> (key, sorted scores)

    def _scores(self, model: Model) -> np.ndarray:
        with self.cache.lock:
            index = self.cache.index(model)
            key = (model.id, id(index), index.version, len(index))
        with self._lock:
            cached = self._sorted.get(model.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        scores = np.sort(np.asarray(self.store.novelties(model.id), dtype=np.float64))  # (M,)
        with self._lock:
            self._sorted[model.name] = (key, scores)
        return scores

    def percentiles(self, model: Model, scores: Sequence[float | None]) -> list[float | None]:
        """Each score's percentile (0-100) among the model's stored ones; None where a score or the
        population is missing. The share of stored values at or below the score, times 100."""
        if all(s is None for s in scores):
            return [None] * len(scores)
        population = self._scores(model)
        if not len(population):
            return [None] * len(scores)
        out: list[float | None] = []
        for score in scores:
            if score is None:
                out.append(None)
                continue
            below = int(np.searchsorted(population, score, side="right"))
            out.append(round(100.0 * below / len(population), 2))
        return out
