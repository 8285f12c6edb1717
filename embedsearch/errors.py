"""One error hierarchy for the whole package.

Every message says what went wrong and, where it can, what to do next. The CLI turns these into
``click.ClickException`` and the HTTP service into JSON 4xx answers; nothing else catches them.
"""

from __future__ import annotations


class EmbedSearchError(Exception):
    """Base class of every error embedsearch raises on purpose."""


class ImageError(EmbedSearchError):
    """A file could not be used as an image (empty, not an image, truncated, too large ...)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DataError(EmbedSearchError):
    """A data set (folder, IDX file) is missing, empty or malformed."""


class ModelError(EmbedSearchError):
    """A model is unknown, of the wrong kind, or its checkpoint is missing or does not match."""


class UnknownModelError(ModelError):
    def __init__(self, name: str, known: list[str]) -> None:
        hint = f"known models: {', '.join(known)}" if known else "the library has no models yet"
        super().__init__(
            f"unknown model {name!r} ({hint}); create one with 'embedsearch train DATA --model KIND --name {name}'"
        )


class StoreError(EmbedSearchError):
    """The metadata database cannot be opened, migrated or written."""


class VectorIndexError(EmbedSearchError):
    """A FAISS index file is unreadable or disagrees with the metadata in a way that cannot be mended."""


class NotFoundError(EmbedSearchError):
    """An image or other record that a caller named does not exist."""


class LockedError(EmbedSearchError):
    """Another process is writing to the library and did not finish in time."""


class InvalidArgumentError(EmbedSearchError):
    """A caller passed a value outside what an operation accepts."""
