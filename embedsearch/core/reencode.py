"""Encoding images the library already holds into a model: for ``train --replace`` and ``check --repair``.

A model made anew must index what the old one held, and an image that lost its vectors must get them
back: both decode the image's file again (the user's file, or the copy the library stored) and encode it.
An image whose file cannot be read any more is reported, never dropped: its row is the user's record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from embedsearch.core.novelty import entries
from embedsearch.core.store import Entry, Store
from embedsearch.data.images import decode_file
from embedsearch.encoders.base import Encoder
from embedsearch.errors import ImageError

log = logging.getLogger(__name__)
BATCH = 256


@dataclass
class Encoded:
    """Vectors of the images that could be read, and the ids of those that could not."""

    entries: list[Entry] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)


def encode_batches(store: Store, encoder: Encoder, ids: Sequence[int], max_pixels: int) -> Iterator[Encoded]:
    """Decode and encode the images ``ids`` from their files, ``BATCH`` at a time."""
    for start in range(0, len(ids), BATCH):
        chunk = list(ids[start : start + BATCH])
        rows = store.images(chunk)
        pixels, good, out = [], [], Encoded()
        for image_id in chunk:
            row = rows.get(image_id)
            try:
                if row is None or not row.path:
                    raise ImageError(f"image {image_id}", "no file on record")
                pixels.append(decode_file(row.path, encoder.spec, max_pixels)[1])
                good.append(image_id)
            except ImageError as exc:
                log.debug("image %d: not re-encoded: %s", image_id, exc)
                out.unreadable.append(image_id)
        if good:
            vectors, scores = encoder.encode_scored(np.stack(pixels))  # (n, dim) float32, (n,) or None
            out.entries = entries(good, vectors, scores)
        yield out


def encode_all(store: Store, encoder: Encoder, ids: Sequence[int], max_pixels: int) -> Encoded:
    out = Encoded()
    for part in encode_batches(store, encoder, ids, max_pixels):
        out.entries += part.entries
        out.unreadable += part.unreadable
    return out
