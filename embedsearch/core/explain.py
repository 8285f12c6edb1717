"""Results explained by the decoder: what a model kept of a query and of each of its hits.

An AE's stored code z and a VAE's stored mean mu are exactly what the model kept of an image, so a
hit's reconstruction is the decoding of its stored vector (its file is not read again) and the
query's is the decoding of its own code. For a VAE the decoded midpoint (mu_query + mu_hit) / 2
shows what the two share in the model's eyes: its prior makes the space between codes decode to
plausible images. A plain AE's space between codes has no such meaning, so it gets no midpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embedsearch.core import knn
from embedsearch.core.models import ModelRegistry
from embedsearch.core.schema import Model
from embedsearch.core.search import IMAGE_ID
from embedsearch.core.store import Store
from embedsearch.data.images import decode_bytes, decode_file
from embedsearch.encoders.base import REGISTRY, DecodingEncoder, PosteriorEncoder, encoder_class
from embedsearch.errors import DataError, InvalidArgumentError, NotFoundError


@dataclass
class ExplainedHit:
    id: int
    reconstruction: np.ndarray  # (S, S, C) uint8: the hit's stored code, decoded
    midpoint: np.ndarray | None  # (S, S, C) uint8: (code_query + code_hit) / 2 decoded; None unless a VAE


@dataclass
class Explanation:
    """A query's reconstruction and its hits', in the order the hits were given."""

    model: str
    query: str  # as named: a path, id:N, or an upload's name
    query_id: int | None  # the library's image, when the query named one
    path: str | None  # the query's file (an id's: the image's; None for bytes or a file no longer recorded)
    reconstruction: np.ndarray  # (S, S, C) uint8
    hits: list[ExplainedHit]

    @property
    def has_midpoints(self) -> bool:
        return any(h.midpoint is not None for h in self.hits)


def decoding_kinds() -> list[str]:
    """The model kinds whose encoders can decode (imports their classes, torch among them)."""
    return [kind for kind in REGISTRY if issubclass(encoder_class(kind), DecodingEncoder)]


class Explainer:
    """Decodes a query's code and its hits' stored codes (and, for a VAE, their midpoints)."""

    def __init__(self, store: Store, registry: ModelRegistry, max_pixels: int) -> None:
        self.store = store
        self.registry = registry
        self.max_pixels = max_pixels

    def decoder(self, model: str) -> DecodingEncoder:
        """The model's encoder if it can decode; otherwise one line saying which kinds can."""
        encoder = self.registry.encoder(model)
        if not isinstance(encoder, DecodingEncoder):
            raise InvalidArgumentError(
                f"model {model!r} ({encoder.kind}) has no decoder, so it cannot explain results; "
                f"explain with a model of kind {' or '.join(decoding_kinds())}"
            )
        return encoder

    def explain(
        self,
        model: str,
        query: str | int | bytes,
        hits: Sequence[int],
        name: str = "<upload>",
        max_pixels: int | None = None,
    ) -> Explanation:
        """Explain ``hits`` (image ids in ``model``'s index) for ``query``: a path, ``id:N`` or an image
        id (its stored code; without one in this model, its file), or an image's bytes (``name`` in
        messages; ``max_pixels`` lowers the library's pixel limit for it)."""
        row = self.registry.model(model)
        encoder = self.decoder(model)
        code, shown, query_id, path = self._query_code(row, encoder, query, name, max_pixels)  # (1, dim)
        stored = dict(self.store.entry_vectors(row.id, list(hits)))
        missing = [i for i in hits if i not in stored]
        if missing:
            raise NotFoundError(self._missing(missing, model))
        blobs = b"".join(stored[i] for i in hits)
        vectors = knn.from_bytes(blobs, row.metric, row.dim) if hits else np.zeros((0, row.dim), np.float32)
        decoded = encoder.decode(np.concatenate([code, vectors]))  # (1 + H, S, S, C): the query first
        mids: list[np.ndarray | None] = [None] * len(hits)
        if isinstance(encoder, PosteriorEncoder) and len(hits):
            mids = list(encoder.decode((code + vectors) / 2))  # (H, dim) -> (H, S, S, C)
        out = [ExplainedHit(i, rec, mid) for i, rec, mid in zip(hits, decoded[1:], mids, strict=True)]
        return Explanation(model, shown, query_id, path, decoded[0], out)

    def _query_code(
        self, row: Model, encoder: DecodingEncoder, query: str | int | bytes, name: str, max_pixels: int | None
    ) -> tuple[np.ndarray, str, int | None, str | None]:
        """(1, dim) code of the query, the name it is shown by, its image id (None: not the library's) and file."""
        limit = self.max_pixels if max_pixels is None else min(max_pixels, self.max_pixels)
        if isinstance(query, bytes):
            return encoder.encode(decode_bytes(query, encoder.spec, name, limit)[1][None]), name, None, None
        match = IMAGE_ID.fullmatch(query) if isinstance(query, str) else None
        if isinstance(query, str) and match is None:
            if not os.path.isfile(query):
                raise DataError(f"{query}: no such image file")
            return encoder.encode(decode_file(query, encoder.spec, limit)[1][None]), query, None, query
        image_id = int(match.group(1)) if match else int(query)
        record = self.store.images([image_id]).get(image_id)
        if record is None:
            raise NotFoundError(f"no image with id {image_id}")
        found = self.store.entry_vectors(row.id, [image_id])
        if found:
            return knn.from_bytes(found[0][1], row.metric, row.dim), f"id:{image_id}", image_id, record.path
        # In the library but not in this model (added to other models only): from its file, as a query would.
        if not record.path or not os.path.isfile(record.path):
            raise NotFoundError(f"image {image_id} is not in model {row.name!r}'s index and its file is gone")
        code = encoder.encode(decode_file(record.path, encoder.spec, limit)[1][None])
        return code, f"id:{image_id}", image_id, record.path

    def _missing(self, ids: list[int], model: str) -> str:
        known = set(self.store.images(ids))
        unknown = [str(i) for i in ids if i not in known]
        if unknown:
            return f"no image with id {', '.join(unknown)}"
        return f"image {', '.join(map(str, ids))} {'is' if len(ids) == 1 else 'are'} not in model {model!r}'s index"
