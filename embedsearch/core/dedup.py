"""Near-duplicate groups of a library's model (``embedsearch duplicates``): the groups that
:mod:`embedsearch.core.duplicates` finds in the model's index, with paths, plus exact copies.

The library stores identical files once (one row per sha256), so the stored vectors cannot show
two copies of the same bytes. Given the folder that was indexed, the files in it whose path is not
stored are hashed: one whose sha256 is a stored image's is an exact copy and joins that image's
group at distance 0 (with the stored image's id: it is the same image).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from embedsearch.core import knn
from embedsearch.core.duplicates import Grouping, check, find_groups
from embedsearch.core.index_cache import IndexCache
from embedsearch.core.models import ModelRegistry
from embedsearch.core.store import Store
from embedsearch.data.images import scan

log = logging.getLogger(__name__)


@dataclass
class DuplicateImage:
    id: int
    path: str | None
    distance: float  # to the group's first image, in the model's distance (as ``query`` shows it)


@dataclass
class DuplicateGroup:
    group: int  # 1, 2, ...: largest group first
    images: list[DuplicateImage]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DuplicateGroup:
        return cls(int(values["group"]), [DuplicateImage(**image) for image in values["images"]])


@dataclass
class DuplicateReport:
    """The groups of one model, and how they were found (``threshold`` is the one used, given or
    calibrated; with ``k``, pairs are mutual k-nearest neighbours and there is no threshold)."""

    model: str
    metric: str
    threshold: float | None
    k: int | None
    calibrated: bool
    method: str  # "exact" (flat range search) or "ivf" (approximate, for large libraries)
    vectors: int
    pairs: int
    exact_copies: int
    seconds: float
    groups: list[DuplicateGroup] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DuplicateReport:
        values = dict(values)
        groups = [DuplicateGroup.from_dict(g) for g in values.pop("groups", [])]
        return cls(**values, groups=groups)


class DuplicateFinder:
    """Groups a model's indexed images; see the module docstring."""

    def __init__(self, store: Store, cache: IndexCache, registry: ModelRegistry) -> None:
        self.store = store
        self.cache = cache
        self.registry = registry

    def find(
        self, model: str, threshold: float | None = None, k: int | None = None, data: str | None = None, seed: int = 0
    ) -> DuplicateReport:
        """Groups of ``model``'s images; ``data``: also the exact copies among that folder's files."""
        row = self.registry.model(model)
        check(row.metric)  # before touching its index: another kind of index may not clone like a flat one
        with self.cache.lock:  # a snapshot: searches and uploads go on while it is grouped
            index = self.cache.index(row)
            live: Any = index.index
            if index.spec.approximate:  # grouping scans a flat index: copy the exact vectors into one
                snapshot = _flat_copy(index.vectors(), row.dim, row.metric)
            elif knn.is_binary(row.metric):  # FAISS cannot clone a binary IDMap2: a round trip through bytes
                snapshot = knn.deserialize(np.frombuffer(knn.serialize(live, row.metric), np.uint8), row.metric)
            else:
                snapshot = faiss.clone_index(live)
        generated = self.cache.generated()
        if generated:  # decoder outputs are not files of the library (queries leave them out too)
            snapshot.remove_ids(np.fromiter(generated, dtype=np.int64))
        grouping = find_groups(snapshot, row.metric, threshold, k, seed=seed)
        copies = self._copies(data) if data is not None else []
        report = DuplicateReport(
            model, row.metric, grouping.threshold, k, threshold is None and k is None, grouping.method,
            grouping.vectors, grouping.pairs, len(copies), round(grouping.seconds, 3),
        )  # fmt: skip
        report.groups = self._groups(grouping, copies)
        return report

    def _copies(self, data: str) -> list[tuple[int, str]]:
        """(stored image id, path) of the files under ``data`` that are exact copies of a stored image."""
        stored = {path for _, path, _ in self.store.image_paths() if path is not None}
        shas: dict[str, list[str]] = {}
        for info in scan(data):
            if info.path in stored or info.size < 0:
                continue
            try:
                with open(info.path, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as exc:
                log.info("%s: not compared for exact copies (%s)", info.path, exc.strerror or exc)
                continue
            shas.setdefault(digest, []).append(info.path)
        found = self.store.all_shas_for(list(shas)) if shas else {}
        return sorted((image_id, path) for sha, image_id in found.items() for path in shas[sha])

    def _groups(self, grouping: Grouping, copies: list[tuple[int, str]]) -> list[DuplicateGroup]:
        members = [(ids.tolist(), dist.tolist()) for ids, dist in grouping.groups]
        where = {i: n for n, (ids, _) in enumerate(members) for i in ids}
        copies_of: dict[int, list[str]] = {}
        for image_id, path in copies:
            if image_id not in where:  # a copy of an image with no near duplicate: a group of its own
                where[image_id] = len(members)
                members.append(([image_id], [0.0]))
            copies_of.setdefault(image_id, []).append(path)
        paths = self.store.labels_paths(sorted({i for ids, _ in members for i in ids}))
        groups = []
        for ids, dist in members:
            images = []
            for i, d in zip(ids, dist, strict=True):
                # An exact copy follows its stored image, at the same distance (the same bytes).
                images += [
                    DuplicateImage(i, p, float(d)) for p in [paths.get(i, (None, None))[0], *copies_of.get(i, [])]
                ]
            groups.append(images)
        groups.sort(key=lambda g: (-len(g), g[0].id))
        return [DuplicateGroup(n, images) for n, images in enumerate(groups, 1)]


def _flat_copy(vectors: dict[int, np.ndarray], dim: int, metric: str) -> Any:
    """An exact IDMap2 of ``vectors`` (image id -> vector as an index holds it: unit length for cosine)."""
    flat = knn.id_index(dim, metric)
    if vectors:
        ids = np.fromiter(vectors, dtype=np.int64, count=len(vectors))
        flat.add_with_ids(np.ascontiguousarray(np.stack(list(vectors.values())), dtype=np.float32), ids)
    return flat
