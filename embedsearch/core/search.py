"""Search by example: image files and folders, uploaded bytes, indexed images, plain vectors."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from embedsearch.core import knn
from embedsearch.core.index_cache import IndexCache
from embedsearch.core.models import ModelRegistry
from embedsearch.core.novelty import NoveltyRanks
from embedsearch.core.store import Store
from embedsearch.data.images import decode_bytes, decode_file, scan
from embedsearch.errors import DataError, ImageError, InvalidArgumentError, NotFoundError
from embedsearch.results import Neighbour, QueryResult

#: A query naming a stored image instead of a file: ``id:123`` (a file of that name: ``./id:123``).
IMAGE_ID = re.compile(r"id:(\d+)")


class Search:
    """Encodes examples the way their model was made and returns neighbours with their metadata."""

    def __init__(self, store: Store, cache: IndexCache, registry: ModelRegistry, max_pixels: int) -> None:
        self.store = store
        self.cache = cache
        self.registry = registry
        self.max_pixels = max_pixels
        self.novelty = NoveltyRanks(store, cache)

    def encode_files(self, paths: list[str], model: str) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
        """Vectors (N, dim) of image files, with the paths used and the failures."""
        encoder = self.registry.encoder(model)
        arrays, used, failed = [], [], []
        for path in paths:
            try:
                arrays.append(decode_file(path, encoder.spec, self.max_pixels)[1])
                used.append(path)
            except ImageError as exc:
                failed.append((path, exc.reason))
        if not arrays:
            return np.zeros((0, encoder.code_width), encoder.code_dtype), used, failed
        return encoder.encode(np.stack(arrays)), used, failed

    def allowed(self, label: str | None = None, under: str | None = None) -> frozenset[int] | None:
        """The ids a search filtered by label and/or path may return; None: no filter."""
        if label is None and under is None:
            return None
        if under is not None and "\x00" in under:
            raise InvalidArgumentError("the folder to search under holds a NUL byte, which no path can; check it")
        folder = None if under is None else str(Path(under).resolve())  # as indexing stored the paths
        return frozenset(self.store.image_ids_where(label, folder))

    def vectors(
        self,
        vectors: np.ndarray,
        model: str,
        k: int = 10,
        include_generated: bool = False,
        only: frozenset[int] | None = None,
    ) -> list[list[Neighbour]]:
        """Nearest indexed images of each vector (N, dim), with their metadata.

        Generated images (``generate --add``) are left out unless ``include_generated``; with
        ``only`` (:meth:`allowed`), every image outside it.
        """
        if k < 1:
            raise InvalidArgumentError("k must be at least 1")
        row = self.registry.model(model)
        exclude = set() if include_generated else self.cache.generated()
        dist, ids = self.cache.search(row, vectors, k, exclude, only)
        found = self.store.labels_paths(sorted({int(i) for i in ids.ravel() if i >= 0}))
        out = []
        for drow, irow in zip(dist, ids, strict=True):
            hits = [(float(d), int(i)) for d, i in zip(drow, irow, strict=True) if i >= 0 and int(i) in found]
            out.append([Neighbour(r, i, *found[i], d) for r, (d, i) in enumerate(hits, 1)])
        return out

    def query(
        self,
        images: list[str],
        model: str,
        k: int = 10,
        batch_size: int = 256,
        include_generated: bool = False,
        label: str | None = None,
        under: str | None = None,
    ) -> Iterator[QueryResult | tuple[str, str]]:
        """Neighbours of each image (folders expand to their images), in batches.

        An item ``id:N`` is the library's image N (its stored vector when the model has one, else its
        file). Yields a QueryResult per good image and a (path, reason) tuple per file that failed or
        id that names no image. A path that does not exist is an error before any search. ``label``
        and ``under`` (a folder or file) keep only the results with that label and/or at that path.
        """
        files: list[str] = []
        for item in images:
            if IMAGE_ID.fullmatch(item):
                files.append(item)
                continue
            if not os.path.exists(item):
                raise DataError(f"{item}: no such file or folder")
            found = [f.path for f in scan(item)] if os.path.isdir(item) else [item]
            if os.path.isdir(item) and not found:
                raise DataError(f"{item}: the folder holds no images")
            files.extend(found)
        row = self.registry.model(model)
        only = self.allowed(label, under)
        for start in range(0, len(files), batch_size):
            vectors, scores, used, failed = self._encode_items(files[start : start + batch_size], model)
            yield from failed
            neighbours = self.vectors(vectors, model, k, include_generated, only)
            ranks = self.novelty.percentiles(row, scores)
            for path, hits, rank in zip(used, neighbours, ranks, strict=True):
                yield QueryResult(path, model, hits, rank)

    def _encode_items(
        self, items: list[str], model: str
    ) -> tuple[np.ndarray, list[float | None], list[str], list[tuple[str, str]]]:
        """:meth:`encode_files` for files and ``id:N`` items: vectors and novelties (an indexed image's
        stored one) in the order of the items used."""
        row = self.registry.model(model)
        ids = [int(m.group(1)) for m in map(IMAGE_ID.fullmatch, items) if m]
        stored = dict(self.store.entry_vectors(row.id, ids)) if ids else {}
        novelty: dict[int, float | None] = self.store.entry_novelty(row.id, list(stored)) if stored else {}
        records = self.store.images([i for i in ids if i not in stored]) if ids else {}
        rows: dict[int, np.ndarray] = {}  # position in items -> (1, width) code
        scores: dict[int, float | None] = {}  # position in items -> novelty
        to_decode: list[tuple[int, str]] = []
        failed: list[tuple[str, str]] = []
        for pos, item in enumerate(items):
            match = IMAGE_ID.fullmatch(item)
            image_id = int(match.group(1)) if match else None
            if image_id is None:
                to_decode.append((pos, item))
            elif image_id in stored:
                rows[pos] = knn.from_bytes(stored[image_id], row.metric, row.dim)
                scores[pos] = novelty.get(image_id)
            elif image_id in records and records[image_id].path:
                to_decode.append((pos, str(records[image_id].path)))
            else:
                reason = "its file is no longer on disk" if image_id in records else f"no image with id {image_id}"
                failed.append((item, reason))
        encoder = self.registry.encoder(model)
        arrays, decoded = [], []
        for pos, path in to_decode:
            try:
                arrays.append(decode_file(path, encoder.spec, self.max_pixels)[1])
                decoded.append(pos)
            except ImageError as exc:
                failed.append((items[pos], exc.reason))
        if arrays:
            codes, measured = encoder.encode_scored(np.stack(arrays))  # (n, width), (n,) or None
            rows.update((pos, code[None]) for pos, code in zip(decoded, codes, strict=True))
            scores.update(zip(decoded, [None] * len(decoded) if measured is None else measured.tolist(), strict=True))
        order = sorted(rows)
        if not order:
            return np.zeros((0, encoder.code_width), encoder.code_dtype), [], [], failed
        vectors = np.concatenate([rows[pos] for pos in order])
        return vectors, [scores[pos] for pos in order], [items[pos] for pos in order], failed

    def query_bytes(
        self,
        data: bytes,
        model: str,
        k: int = 10,
        include_generated: bool = False,
        name: str = "<upload>",
        max_pixels: int | None = None,
        label: str | None = None,
        under: str | None = None,
    ) -> QueryResult:
        """Neighbours of an image given as bytes, and its out-of-distribution percentile; ``max_pixels``
        lowers the library's pixel limit for it (the service's limit for query images), checked from
        the header before anything is decoded."""
        encoder = self.registry.encoder(model)
        limit = self.max_pixels if max_pixels is None else min(max_pixels, self.max_pixels)
        _, pixels = decode_bytes(data, encoder.spec, name, limit)
        code, scores = encoder.encode_scored(pixels[None])  # (1, width), (1,) or None
        hits = self.vectors(code, model, k, include_generated, self.allowed(label, under))[0]
        [rank] = self.novelty.percentiles(self.registry.model(model), [None if scores is None else float(scores[0])])
        return QueryResult(name, model, hits, rank)

    def query_image(
        self,
        image_id: int,
        model: str,
        k: int = 10,
        include_generated: bool = False,
        label: str | None = None,
        under: str | None = None,
    ) -> QueryResult:
        """Neighbours of an indexed image, from its stored vector (no decoding), and the percentile of
        its stored novelty."""
        row = self.registry.model(model)
        found = self.store.entry_vectors(row.id, [image_id])
        if not found:
            if not self.store.images([image_id]):
                raise NotFoundError(f"no image with id {image_id}")
            raise NotFoundError(f"image {image_id} is not in model {model!r}'s index")
        vector = knn.from_bytes(found[0][1], row.metric, row.dim)  # (1, dim), or (1, dim // 8) bits
        hits = self.vectors(vector, model, k, include_generated, self.allowed(label, under))[0]
        [rank] = self.novelty.percentiles(row, [self.store.entry_novelty(row.id, [image_id]).get(image_id)])
        return QueryResult(f"id:{image_id}", model, hits, rank)
