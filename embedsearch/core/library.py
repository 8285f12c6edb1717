"""Single images by id: uploads stored by content hash, metadata, deletion, search by example bytes.

A mixin of :class:`Engine`; the HTTP service calls these. Uploaded bytes are kept under
``HOME/uploads/<sha[:2]>/<sha>.<ext>`` — named by their hash and the format Pillow detected, never
by anything a client sent — so no request can name a path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.core.vectors import atomic_write
from embedsearch.data.images import decode_bytes, sha256
from embedsearch.errors import ImageError, InvalidArgumentError, NotFoundError
from embedsearch.results import Added, ImageRecord

if TYPE_CHECKING:
    from embedsearch.core.generate import Generation
    from embedsearch.engine import Engine, Neighbour

log = logging.getLogger(__name__)

FORMATS = {  # Pillow format -> (file ending, content type)
    "PNG": (".png", "image/png"),
    "JPEG": (".jpg", "image/jpeg"),
    "MPO": (".jpg", "image/jpeg"),
    "WEBP": (".webp", "image/webp"),
    "GIF": (".gif", "image/gif"),
    "BMP": (".bmp", "image/bmp"),
    "TIFF": (".tif", "image/tiff"),
}


class ImagesMixin:
    """Image-level operations. Relies on Engine's store, home, encoders, indexes and locks."""

    def stored_path(self: Engine, sha256: str, fmt: str, folder: str = "uploads") -> Path:
        return self.home / folder / sha256[:2] / f"{sha256}{FORMATS.get(fmt, ('.img', ''))[0]}"

    def add_image(
        self: Engine, data: bytes, label: str | None = None, models: list[str] | None = None, name: str = "<upload>"
    ) -> Added:
        """Store uploaded bytes by content hash and index them into every model (or ``models``)."""
        names = models or [m.name for m in self.store.models()]
        targets = [(self.model(n), self.encoder(n)) for n in names]  # unknown model: error before writing
        if not targets:
            raise InvalidArgumentError("the library has no models to index into; make one first")
        decoded = [decode_bytes(data, enc.spec, name, self.max_pixels) for _, enc in targets]  # ImageError
        meta = decoded[0][0]
        if meta.format not in FORMATS:
            raise ImageError(name, f"{meta.format} is not an accepted upload format")
        with self.writing():
            existing = self.store.all_shas_for([meta.sha256]).get(meta.sha256)
            path = self.stored_path(meta.sha256, meta.format)
            if existing is None and not path.exists():
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
            for (model, encoder), (_, pixels) in zip(targets, decoded, strict=False):
                if image_id is not None and image_id in self.store.entry_ids_of(model.id, [image_id]):
                    continue
                vector = encoder.encode(pixels[None])  # (1, dim)
                key: int | str = image_id if image_id is not None else meta.sha256
                new = self.store.write_batch(
                    model.id, [values] if image_id is None else [], [], [(key, vector[0].tobytes())]
                )
                image_id = new.get(meta.sha256, image_id)
                with self.index_lock:
                    index = self.vector_index(model.name)
                    index.remove(np.array([image_id]))
                    index.add(np.array([image_id]), vector)
                    self._dirty.add(model.name)
        if image_id is None:  # every target model had it already
            raise InvalidArgumentError("nothing was indexed")
        return Added(image_id, existing is None, meta.sha256)

    def image(self: Engine, image_id: int) -> ImageRecord:
        row = self.store.images([image_id]).get(image_id)
        if row is None:
            raise NotFoundError(f"no image with id {image_id}")
        models = self.store.models_of(image_id)
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
            models,
        )

    def image_file(self: Engine, image_id: int) -> tuple[Path, str]:
        """The stored file of an image and its content type."""
        record = self.image(image_id)
        if record.path is None or not Path(record.path).is_file():
            raise NotFoundError(f"image {image_id}: its file is no longer on disk")
        return Path(record.path), FORMATS.get(record.format, ("", "application/octet-stream"))[1]

    def delete_image(self: Engine, image_id: int) -> None:
        """Forget an image: metadata, vectors and, for an upload or generated image, the stored file."""
        record = self.image(image_id)
        with self.writing():
            self.store.delete_images([image_id])
            with self.index_lock:
                for name in list(self._indexes):
                    self._indexes[name].remove(np.array([image_id]))
                    self._dirty.add(name)
            if self._generated is not None:
                self._generated.discard(image_id)
        if record.path and self.owns(Path(record.path)):
            Path(record.path).unlink(missing_ok=True)

    def owns(self: Engine, path: Path) -> bool:
        """True for files the library itself wrote (uploads, generated images), never user folders."""
        resolved = path.resolve()
        return any(resolved.is_relative_to(self.home / sub) for sub in ("uploads", "generated"))

    def search_bytes(
        self: Engine, data: bytes, model: str, k: int = 10, include_generated: bool = False, name: str = "<upload>"
    ) -> list[Neighbour]:
        encoder = self.encoder(model)
        _, pixels = decode_bytes(data, encoder.spec, name, self.max_pixels)
        return self.search_vectors(encoder.encode(pixels[None]), model, k, include_generated)[0]

    def search_image(
        self: Engine, image_id: int, model: str, k: int = 10, include_generated: bool = False
    ) -> list[Neighbour]:
        """Neighbours of an indexed image, from its stored vector (no decoding)."""
        row = self.model(model)
        found = self.store.entry_vectors(row.id, [image_id])
        if not found:
            self.image(image_id)  # NotFoundError when the image itself is unknown
            raise NotFoundError(f"image {image_id} is not in model {model!r}'s index")
        vector = np.frombuffer(found[0][1], dtype=np.float32)[None]  # (1, dim)
        return self.search_vectors(vector, model, k, include_generated)[0]

    def add_generated(self: Engine, generation: Generation) -> None:
        """Store candidates as generated images with their provenance, in the generating model's index."""
        from embedsearch.core.generate import to_png

        model, encoder = self.model(generation.model), self.encoder(generation.model)
        pngs = [to_png(c.image) for c in generation.candidates]
        vectors = encoder.encode(np.stack([c.image for c in generation.candidates]))  # (N, dim)
        digests = [sha256(p) for p in pngs]
        with self.writing():
            known = self.store.all_shas_for(digests)
            first: dict[str, int] = {}  # digest -> index of the first candidate with those bytes
            rows = []
            for i, (cand, png, digest) in enumerate(zip(generation.candidates, pngs, digests, strict=False)):
                if digest in known or digest in first:
                    continue
                first[digest] = i
                path = self.stored_path(digest, "PNG", "generated")
                atomic_write(path, png)
                rows.append(
                    {
                        "path": str(path),
                        "sha256": digest,
                        "width": cand.image.shape[1],
                        "height": cand.image.shape[0],
                        "format": "PNG",
                        "mode": "L" if cand.image.shape[-1] == 1 else "RGB",
                        "label": None,
                        "bytes": len(png),
                        "mtime": None,
                        "generated": True,
                        "provenance": generation.provenance(cand),
                    }
                )
            ids = self.store.write_batch(model.id, rows, [], [(d, vectors[i].tobytes()) for d, i in first.items()])
            with self.index_lock:
                new = np.array([ids[d] for d in first], dtype=np.int64)
                self.vector_index(model.name).add(new, vectors[list(first.values())])
                self._dirty.add(model.name)
                self.generated_ids().update(new.tolist())
        for cand, digest in zip(generation.candidates, digests, strict=False):
            cand.id = ids.get(digest, known.get(digest))

    def remove_generated(self: Engine) -> int:
        """Delete every generated image: rows, vectors and files."""
        with self.writing():
            ids = sorted(self.store.generated_ids())
            records = self.store.images(ids)
            removed = self.store.delete_images(ids)
            with self.index_lock:
                for name in list(self._indexes):
                    self._indexes[name].remove(np.array(ids, dtype=np.int64))
                    self._dirty.add(name)
            self._generated = set()
        for row in records.values():
            if row.path and self.owns(Path(row.path)):
                Path(row.path).unlink(missing_ok=True)
        return removed

    def stats(self: Engine) -> dict[str, Any]:
        counts = self.store.counts()
        return {
            "images": counts["images"],
            "generated": len(self.generated_ids()),
            "models": counts["models"],
            "vectors": {m.name: m.vectors for m in self.models()},
        }
