"""One error hierarchy for the whole package.

Every message says what went wrong and, where it can, what to do next. The CLI turns these into
``click.ClickException`` and the HTTP service into JSON 4xx answers; nothing else catches them.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager


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


class NoLibraryError(EmbedSearchError):
    """A read found no library where it was sent: reads never create one (writes like ``index`` do)."""

    def __init__(self, where: str) -> None:
        super().__init__(
            f"no library at {where}; create one with 'embedsearch index FOLDER --model pixels' (or check --home/--db)"
        )


class ReadOnlyError(EmbedSearchError):
    """The library cannot be written by this user (another user's, a read-only disk); reading it works."""


class ExtraNotInstalledError(EmbedSearchError):
    """A feature needs an optional extra that is not installed; the message says how to install it."""


class ClusterError(EmbedSearchError):
    """A Ray cluster could not be started or reached, or one of its workers failed mid-run."""


class DiskFullError(EmbedSearchError):
    """A write failed for want of space; what was committed before it is kept.

    ``what`` says what failed ("disk full while writing the database (...)"), ``kept`` what survived
    it; :meth:`keeping` adds the latter where it is known (a bulk run knows its committed batches).
    """

    def __init__(self, what: str, kept: str = "") -> None:
        self.what, self.kept = what, kept
        super().__init__(f"{what}{'; ' + kept if kept else ''}; free space and run again")

    def keeping(self, kept: str) -> DiskFullError:
        return DiskFullError(self.what, kept)


class FileAccessError(EmbedSearchError):
    """A file or folder the library needs cannot be created, read or written."""


#: errno values that mean "no space left" (ENOSPC, EDQUOT).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def from_os_error(exc: OSError, doing: str) -> EmbedSearchError:
    """The package error for an OSError met while ``doing`` (say "cannot write /x/y"): one line, no traceback."""
    reason = exc.strerror or str(exc)
    if exc.errno in DISK_FULL_ERRNOS:
        return DiskFullError(f"disk full: {doing} ({reason})")
    if exc.errno == errno.EROFS:
        return ReadOnlyError(f"{doing}: {reason}; the library can be read but not written here")
    return FileAccessError(f"{doing}: {reason}")


@contextmanager
def os_errors(doing: str) -> Iterator[None]:
    """Turn an OSError inside the block into the package's error for ``doing`` ("cannot write X")."""
    try:
        yield
    except OSError as exc:
        raise from_os_error(exc, doing) from None
