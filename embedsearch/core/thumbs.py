"""Thumbnails: small pictures of stored images for the web page, cached by content hash.

``HOME/thumbs/<sha[:2]>/<sha>-<size>.webp``: WebP at quality 80, the longer side at most ``size``
(never enlarged), EXIF orientation applied, transparency on white. Made on the first request, not
while indexing: most images of a library are never shown, and indexing decodes at the model's
size (a 64 px model drafts a JPEG to 1/8), too small for a 256 px thumbnail.

Only ever made from verified bytes (:meth:`ImageLibrary.image_bytes`: the recorded size and sha256),
and named by that sha256: a file whose content changed gives the stored-content error, never a
thumbnail of what is on disk now, and a changed image can never be shown a stale thumbnail. The
cache is only a cache: deleting an image deletes its thumbnails, ``check --repair`` removes those of
content no image has any more (a re-indexed changed file), and deleting the folder costs nothing
but the time to make them again.

Why WebP: at 256 px and the same PSNR, WebP quality 80 takes 0.61 x the bytes of JPEG on
benchmarks/thumbs.py's textured photos, 0.72-0.77 x on benchmarks/photos.py's smoother ones.
"""

from __future__ import annotations

import io
import logging
import os
import threading

from embedsearch.core.layout import Layout
from embedsearch.core.library import ImageLibrary
from embedsearch.data.images import shrunk_image
from embedsearch.errors import InvalidArgumentError
from embedsearch.files import atomic_write
from embedsearch.results import ImageRecord, Thumbnail

log = logging.getLogger(__name__)

#: The sizes a thumbnail can be asked for (a small set: each is a file in the cache).
SIZES = (128, 256, 512)
DEFAULT_SIZE = 256
QUALITY = 80
MEDIA_TYPE = "image/webp"
#: An image no larger than the size asked for, stored in a format every browser shows and at most this
#: many bytes, is its own thumbnail: re-encoding a 28x28 PNG would only make it larger and blurrier.
SMALL_ORIGINAL_BYTES = 64 * 1024
_SHOWN_AS_IS = frozenset({"PNG", "JPEG", "GIF", "WEBP"})


class Thumbnails:
    """Makes and caches thumbnails; at most ``makers`` (one per core) are made at once, and cache hits
    never wait. One per core, not the service's cores - 1 for uploads: a make is short (a 12 MP JPEG
    decodes at 1/8 scale: ~40 ms) and is what a person is waiting on (16 tiles on 2 cores: 0.7 s, on
    one 1.2 s); its memory is that of one decode within the pixel limit.
    """

    def __init__(self, library: ImageLibrary, layout: Layout, max_pixels: int, makers: int | None = None) -> None:
        self.library = library
        self.layout = layout
        self.max_pixels = max_pixels
        self._making = threading.BoundedSemaphore(makers or os.cpu_count() or 1)

    def thumbnail(self, image_id: int, size: int = DEFAULT_SIZE) -> Thumbnail:
        """The thumbnail of an image: from the cache, the original itself if small, or made now.

        NotFoundError for an unknown id or a file that changed on disk since it was indexed (no
        cached thumbnail of it yet); ImageError if its bytes cannot be decoded.
        """
        if size not in SIZES:
            raise InvalidArgumentError(f"thumbnail size must be one of {', '.join(map(str, SIZES))}, not {size}")
        record = self.library.image(image_id)  # NotFoundError
        path = self.layout.thumb_path(record.sha256, size)
        try:
            return Thumbnail(path.read_bytes(), MEDIA_TYPE, record.sha256, size)
        except OSError:
            pass  # not made yet (or unreadable: made again)
        data, media_type = self.library.image_bytes(image_id)  # verified against size and sha256
        if _as_is(record, size):
            return Thumbnail(data, media_type, record.sha256, size)
        with self._making:
            picture = shrunk_image(data, size, f"image {image_id}", self.max_pixels)
            out = io.BytesIO()
            picture.save(out, "WEBP", quality=QUALITY, method=4)
        webp = out.getvalue()
        try:
            atomic_write(path, webp)
        except OSError as exc:  # a read-only library still serves thumbnails, it only cannot keep them
            log.debug("thumbnail of image %d not cached: %s", image_id, exc)
        return Thumbnail(webp, MEDIA_TYPE, record.sha256, size)


def _as_is(record: ImageRecord, size: int) -> bool:
    # Browsers apply EXIF orientation to images themselves, and the recorded size is the upright one.
    small = max(record.width, record.height) <= size and record.bytes <= SMALL_ORIGINAL_BYTES
    return small and record.format in _SHOWN_AS_IS
