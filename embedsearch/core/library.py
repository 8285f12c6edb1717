"""Single images by id: uploads stored by content hash, metadata, deletion, generated images.

Uploaded bytes are kept under ``HOME/uploads/<sha[:2]>/<sha>.<ext>`` (generated images under
``HOME/generated/``), named by their hash and the format Pillow detected, never by anything a
client sent, so no request can name a path. Stored files are written and deleted under the writer
lock, so a deletion racing an upload of the same content can never remove an acknowledged file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedsearch.core import novelty
from embedsearch.core.index_cache import IndexCache
from embedsearch.core.layout import FORMATS, Layout
from embedsearch.core.models import ModelRegistry
from embedsearch.core.store import Store
from embedsearch.data.images import decode_bytes_for, decode_file, sha256
from embedsearch.encoders.base import DecodingEncoder
from embedsearch.errors import DataError, ImageError, InvalidArgumentError, NotFoundError, os_errors
from embedsearch.files import atomic_write
from embedsearch.results import Added, ImageRecord

log = logging.getLogger(__name__)


@dataclass
class NewImage:
    """A generated image to store: its PNG bytes, pixels (S, S, C) uint8 and provenance."""

    png: bytes
    pixels: np.ndarray
    provenance: dict[str, Any]


class ImageLibrary:
    """Image-level operations over the store, the index cache and the model registry."""

    def __init__(
        self, store: Store, layout: Layout, cache: IndexCache, registry: ModelRegistry, max_pixels: int
    ) -> None:
        self.store = store
        self.layout = layout
        self.cache = cache
        self.registry = registry
        self.max_pixels = max_pixels

    def add_image(
        self, data: bytes, label: str | None = None, models: list[str] | None = None, name: str = "<upload>"
    ) -> Added:
        """Store uploaded bytes by content hash and index them into every model (or ``models``)."""
        names = models or [m.name for m in self.store.models()]
        targets = [(self.registry.model(n), self.registry.encoder(n)) for n in names]  # unknown: fail first
        if not targets:
            raise InvalidArgumentError("the library has no models to index into; make one first")
        # One decode for every model: a hostile upload costs its decode once, not once per model.
        specs = list(dict.fromkeys(enc.spec for _, enc in targets))
        meta, arrays = decode_bytes_for(data, specs, name, self.max_pixels)  # ImageError
        pixels_of = dict(zip(specs, arrays, strict=True))
        if meta.format not in FORMATS:
            raise ImageError(name, f"{meta.format} is not an accepted upload format")
        with self.cache.writing():
            existing = self.store.all_shas_for([meta.sha256]).get(meta.sha256)
            path = self.layout.stored_path(meta.sha256, meta.format)
            if existing is None and not path.exists():
                with os_errors(f"cannot store the upload {name} as {path}"):
                    atomic_write(path, data)
            values = {
                "path": str(path),
                "sha256": meta.sha256,
                "width": meta.width,
                "height": meta.height,
                "format": meta.format,
                "mode": meta.mode,
                "label": label,
                "bytes": meta.bytes,
                "mtime": None,
            }
            image_id = existing
            key: int | str = existing if existing is not None else meta.sha256
            lacking = [(m, e) for m, e in targets if existing is None or not self.store.entry_ids_of(m.id, [existing])]
            scored = [encoder.encode_scored(pixels_of[encoder.spec][None]) for _, encoder in lacking]  # (1, dim) each
            vectors = [v for v, _ in scored]
            if lacking:  # the image and every model's vector in one transaction
                entries = {m.id: novelty.entries([key], v, n) for (m, _), (v, n) in zip(lacking, scored, strict=True)}
                new = self.store.write_batch(entries, [values] if existing is None else [])
                image_id = new.get(meta.sha256, image_id)
                for (model, _), vector in zip(lacking, vectors, strict=True):
                    self.cache.add(model, np.array([image_id], dtype=np.int64), vector)
        if image_id is None:  # every target model had it already
            raise InvalidArgumentError("nothing was indexed")
        return Added(image_id, existing is None, meta.sha256)

    def image(self, image_id: int) -> ImageRecord:
        row = self.store.images([image_id]).get(image_id)
        if row is None:
            raise NotFoundError(f"no image with id {image_id}")
        return ImageRecord(
            row.id,
            row.path,
            row.sha256,
            row.width,
            row.height,
            row.format,
            row.label,
            row.bytes,
            row.added_at.isoformat(timespec="seconds"),
            row.generated,
            row.provenance,
            self.store.models_of(image_id),
        )

    def image_file(self, image_id: int) -> tuple[Path, str]:
        """The stored file of an image and its content type."""
        record = self.image(image_id)
        if record.path is None or not Path(record.path).is_file():
            raise NotFoundError(f"image {image_id}: its file is no longer on disk")
        return Path(record.path), FORMATS.get(record.format, ("", "application/octet-stream"))[1]

    def image_bytes(self, image_id: int) -> tuple[bytes, str]:
        """The bytes of an image exactly as recorded, and their content type.

        Read from one descriptor opened without following a symlink, and checked against the recorded
        size and sha256 before anything is returned: a file replaced (by a symlink to a secret, or by
        other content) or deleted since it was indexed is refused, never served.
        """
        record = self.image(image_id)
        content_type = FORMATS.get(record.format, ("", "application/octet-stream"))[1]
        changed = NotFoundError(
            f"image {image_id}: its file changed on disk since it was indexed; run 'embedsearch index' again"
        )
        if record.path is None:
            raise NotFoundError(f"image {image_id}: its file is no longer on disk")
        try:
            fd = os.open(record.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise NotFoundError(f"image {image_id}: its file is no longer on disk") from None
        except OSError:
            raise changed from None  # a symlink (ELOOP), a folder, no permission ...
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size != record.bytes:
                raise changed
            data = file.read(record.bytes + 1)
        if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
            raise changed
        return data, content_type

    def owns(self, path: Path) -> bool:
        """True for files the library itself wrote (uploads, generated images), never user folders."""
        return self.layout.owns(path)

    def delete_image(self, image_id: int) -> None:
        """Forget an image: metadata, vectors and, for an upload or generated image, the stored file."""
        self.image(image_id)  # NotFoundError
        self._delete([image_id])

    def remove(self, paths: list[str]) -> int:
        """Forget the images at these paths (a folder: everything under it).

        User files stay on disk; files the library stored itself (uploads, generated) are deleted.
        """
        with self.cache.writing():
            ids: list[int] = []
            for path in paths:
                matches = self.store.images_under(str(Path(path).resolve()))
                if not matches:
                    raise DataError(f"{path}: no indexed image at or under this path")
                ids.extend(m.id for m in matches)
            return self._delete(sorted(set(ids)))

    def remove_generated(self) -> int:
        """Delete every generated image: rows, vectors and files."""
        with self.cache.writing():
            return self._delete(sorted(self.store.generated_ids()))

    def _delete(self, ids: list[int]) -> int:
        """Rows, vectors, stored files and cached thumbnails of ``ids``, all under the writer lock."""
        with self.cache.writing():
            records = self.store.images(ids)
            removed = self.store.delete_images(ids)
            self.cache.remove_images(ids)
            for row in records.values():
                if row.path:
                    self.layout.delete_stored(row.path)
                self.layout.delete_thumbnails(row.sha256)  # sha256 is unique: no other image shows these
        return removed

    def add_generated(self, model_name: str, images: list[NewImage]) -> list[int]:
        """Store generated images with their provenance, in the generating model's index; their ids."""
        model, encoder = self.registry.model(model_name), self.registry.encoder(model_name)
        if not images:
            return []
        vectors, scores = encoder.encode_scored(np.stack([im.pixels for im in images]))  # (N, dim), (N,) or None
        digests = [sha256(im.png) for im in images]
        with self.cache.writing():
            known = self.store.all_shas_for(digests)
            first: dict[str, int] = {}  # digest -> index of the first image with those bytes
            rows = []
            for i, (im, digest) in enumerate(zip(images, digests, strict=True)):
                if digest in known or digest in first:
                    continue
                first[digest] = i
                path = self.layout.stored_path(digest, "PNG", "generated")
                with os_errors(f"cannot store a generated image as {path}"):
                    atomic_write(path, im.png)
                rows.append(
                    {
                        "path": str(path),
                        "sha256": digest,
                        "width": im.pixels.shape[1],
                        "height": im.pixels.shape[0],
                        "format": "PNG",
                        "mode": "L" if im.pixels.shape[-1] == 1 else "RGB",
                        "label": None,
                        "bytes": len(im.png),
                        "mtime": None,
                        "generated": True,
                        "provenance": im.provenance,
                    }
                )
            keep = list(first.values())
            entries = novelty.entries(list(first), vectors[keep], None if scores is None else scores[keep])
            ids = self.store.write_batch({model.id: entries}, rows)
            new = np.array([ids[d] for d in first], dtype=np.int64)
            self.cache.add(model, new, vectors[list(first.values())])
            self.cache.mark_generated(new.tolist())
        return [ids.get(d, known.get(d, -1)) for d in digests]

    def reconstruct(self, paths: list[str], model: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(N, S, S, C) originals at the model's input and their reconstructions, with the paths used."""
        encoder = self.registry.encoder(model)
        if not isinstance(encoder, DecodingEncoder):
            raise InvalidArgumentError(f"model {model!r} ({encoder.kind}) has no decoder to reconstruct with")
        arrays, used = [], []
        for path in paths:
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such image file")
            arrays.append(decode_file(path, encoder.spec, self.max_pixels)[1])
            used.append(path)
        originals = np.stack(arrays)
        return originals, encoder.reconstruct(originals), used

    def stats(self) -> dict[str, Any]:
        counts = self.store.counts()
        return {
            "images": counts["images"],
            "generated": len(self.cache.generated()),
            "models": counts["models"],
            "vectors": {m.name: m.vectors for m in self.registry.models()},
        }
