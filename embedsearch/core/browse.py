"""Browsing the library: pages of images (optionally of one label), the labels with their counts,
and a 2-D map of a model's vectors.

The map is a seeded PCA to two dimensions of a seeded sample of at most :data:`MAP_POINTS` stored
vectors (binary hash codes unpacked to their bits first): cheap, deterministic and honest about
what it is, a linear view of the two directions along which the codes vary most. It is cached per
model until the model's entries change (their count or newest entry id), so a page that draws it
again costs nothing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from sqlalchemy import func, select

from embedsearch.core import knn
from embedsearch.core.models import ModelRegistry
from embedsearch.core.schema import Image
from embedsearch.core.store import Store
from embedsearch.errors import InvalidArgumentError

log = logging.getLogger(__name__)

#: The most points a map shows: enough to see clusters, few enough for a page to draw at once.
MAP_POINTS = 3000
#: The most images one page of the browser may ask for.
MAX_PAGE = 200


@dataclass
class ImageBrief:
    """What a browser tile needs of an image: no folders, no per-model list (one query per page)."""

    id: int
    name: str | None  # the file's name only
    label: str | None
    width: int
    height: int
    generated: bool


@dataclass
class ImagePage:
    total: int  # images that match the filter, on every page
    offset: int
    limit: int
    images: list[ImageBrief]


@dataclass
class LabelCount:
    label: str | None  # None: the images without a label
    count: int


@dataclass
class MapPoint:
    id: int
    x: float
    y: float
    label: str | None


@dataclass
class VectorMap:
    model: str
    vectors: int  # the model's vectors; ``points`` holds a sample of at most MAP_POINTS of them
    seed: int
    explained: list[float]  # the share of the sample's variance along each of the two axes
    points: list[MapPoint]


def project_2d(vectors: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """(N, D) float -> ((N, 2) float32 PCA coordinates, explained variance ratio of each axis).

    Deterministic: each axis's sign is fixed so that its largest loading is positive. Fewer than two
    directions of variance (one point, identical vectors) give zeros on the missing axes.
    """
    x = vectors.astype(np.float64)
    x -= x.mean(axis=0, keepdims=True)  # (N, D)
    if len(x) < 2 or not np.any(x):
        return np.zeros((len(x), 2), np.float32), [0.0, 0.0]
    _, s, vt = np.linalg.svd(x, full_matrices=False)  # vt: (min(N, D), D)
    axes = vt[:2]  # (<=2, D)
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])
    axes = axes * signs[:, None]
    coords = np.zeros((len(x), 2), np.float64)
    coords[:, : len(axes)] = x @ axes.T  # (N, <=2)
    var = s**2
    explained = [float(v / var.sum()) for v in var[:2]] + [0.0] * (2 - min(2, len(var)))
    return coords.astype(np.float32), explained


class Browser:
    """Pages and labels from the store; maps from the stored vectors, cached per model."""

    def __init__(self, store: Store, registry: ModelRegistry) -> None:
        self.store = store
        self.registry = registry
        self._maps: dict[str, tuple[tuple[object, ...], VectorMap]] = {}
        self._lock = threading.Lock()

    def images(self, label: str | None = None, offset: int = 0, limit: int = 48) -> ImagePage:
        """Images in id order (the order they were added), ``limit`` from ``offset``; ``label``: only those."""
        if not 1 <= limit <= MAX_PAGE or offset < 0:
            raise InvalidArgumentError(f"a page holds 1 to {MAX_PAGE} images from an offset of 0 or more")
        where = [] if label is None else [Image.label == label]
        columns = (Image.id, Image.path, Image.label, Image.width, Image.height, Image.generated)
        with self.store.session() as s:
            total = s.scalar(select(func.count(Image.id)).where(*where)) or 0
            rows = s.execute(select(*columns).where(*where).order_by(Image.id).offset(offset).limit(limit)).all()
        briefs = [
            ImageBrief(i, PurePosixPath(p).name if p else None, lab, w, h, bool(g)) for i, p, lab, w, h, g in rows
        ]
        return ImagePage(total, offset, limit, briefs)

    def labels(self) -> list[LabelCount]:
        """Every label with its number of images, most common first (ties by name); None: unlabelled."""
        with self.store.session() as s:
            rows = s.execute(select(Image.label, func.count(Image.id)).group_by(Image.label)).all()
        counted = [LabelCount(label, int(n)) for label, n in rows]
        return sorted(counted, key=lambda c: (-c.count, c.label is None, c.label or ""))

    def vector_map(self, model: str, seed: int = 0) -> VectorMap:
        """A 2-D PCA of a seeded sample of the model's stored vectors, coloured by the caller by label."""
        row = self.registry.model(model)  # UnknownModelError
        count, newest = self.store.entry_stamp(row.id)
        key = (row.id, row.checkpoint_sha256, count, newest)  # a model made anew, or vectors changed
        with self._lock:
            cached = self._maps.get(model)
        if cached is not None and cached[0] == key and cached[1].seed == seed:
            return cached[1]
        ids = np.array(sorted(self.store.entry_image_ids(row.id)), dtype=np.int64)
        if len(ids) > MAP_POINTS:
            ids = np.sort(np.random.default_rng(seed).choice(ids, MAP_POINTS, replace=False))
        pairs = self.store.entry_vectors(row.id, ids.tolist())
        found = np.array([i for i, _ in pairs], dtype=np.int64)
        codes = knn.from_bytes(b"".join(v for _, v in pairs), row.metric, row.dim)  # (N, width)
        if knn.is_binary(row.metric):
            codes = np.unpackbits(codes, axis=1)  # (N, dim) bits: each bit one axis of the code
        coords, explained = project_2d(codes)
        labels = self.store.labels_paths(found.tolist())
        points = [
            MapPoint(int(i), float(x), float(y), labels.get(int(i), (None, None))[1])
            for i, (x, y) in zip(found, coords, strict=True)
        ]
        made = VectorMap(model, count, seed, explained, points)
        with self._lock:
            self._maps[model] = (key, made)
        log.debug("map of %s: %d of %d vectors", model, len(points), count)
        return made
