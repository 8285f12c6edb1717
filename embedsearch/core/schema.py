"""The metadata schema as SQLAlchemy 2.0 ORM classes; Alembic's migrations create it.

``migrations/versions/`` holds the schema's history; ``tests/test_store.py`` checks that a
migrated database matches these classes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

#: Marks an escape in stored paths: a noncharacter (U+FDD0, reserved for internal use) never met in names.
_ESC = "\ufdd0"


def encode_name(name: str) -> str:
    """A file name as valid UTF-8 text, losslessly.

    Names that are not valid UTF-8 on disk reach Python with lone surrogates (``os.fsdecode``'s
    surrogateescape); a database takes only valid UTF-8. Each surrogate becomes U+FDD0 and its 4 hex
    digits, U+FDD0 itself is doubled, every other character stays: so valid names are stored as they
    are, and prefixes stay prefixes (``remove FOLDER`` matches by prefix).
    """
    if name.isascii():  # the common case, checked in C: a bulk run stores thousands of names per batch
        return name
    if _ESC not in name:
        try:
            name.encode("utf-8")  # lone surrogates do not encode
            return name
        except UnicodeEncodeError:
            pass
    return "".join(_ESC * 2 if c == _ESC else f"{_ESC}{ord(c):04x}" if "\ud800" <= c <= "\udfff" else c for c in name)


def decode_name(text: str) -> str:
    """The inverse of :func:`encode_name`."""
    if _ESC not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] != _ESC:
            out.append(text[i])
            i += 1
        elif text[i + 1 : i + 2] == _ESC:
            out.append(_ESC)
            i += 2
        else:
            out.append(chr(int(text[i + 1 : i + 5], 16)))
            i += 5
    return "".join(out)


class NameText(TypeDecorator[str]):
    """A String column for file names and labels: any name the file system gives, stored losslessly."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else encode_name(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else decode_name(value)


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str | None] = mapped_column(NameText, unique=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(NameText, index=True)
    bytes: Mapped[int] = mapped_column(Integer)
    mtime: Mapped[float | None] = mapped_column(Float)
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    #: Made by a model's decoder (embedsearch generate --add), not found on disk or uploaded.
    generated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false(), index=True)
    #: Where a generated image came from: model, mode, seed, source images.
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    dim: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(8))
    image_size: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(Integer)
    # The resize policy (embedsearch.data.resize.FITS), the third part of the input spec beside
    # image_size and channels; validated by InputSpec, not by the database (the policies are code).
    fit: Mapped[str] = mapped_column(String(16), default="pad", server_default="pad")
    checkpoint_path: Mapped[str | None] = mapped_column(String)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    #: The index's type, parameters and measured recall (embedsearch.core.ann.IndexSpec); null = flat.
    #: Recorded here so that an index rebuilt from the database has the type the user chose.
    index_spec: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class IndexEntry(Base):
    """Image ``image_id`` is in model ``model_id``'s index with this vector.

    Entries are never updated in place: re-encoding deletes and inserts, so a growing ``id`` tells
    a FAISS file which entries it has not seen yet.
    """

    __tablename__ = "index_entries"
    # AUTOINCREMENT: SQLite would otherwise reuse the id of a deleted last row.
    __table_args__ = (
        UniqueConstraint("model_id", "image_id", name="uq_entry_model_image"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    #: How unusual the image is for the model (AE: reconstruction loss, VAE: negative ELBO), measured
    #: when it was encoded; null for kinds without one and for entries written before it was stored.
    novelty: Mapped[float | None] = mapped_column(Float, nullable=True)


#: id, path and label of the images whose ids are in the JSON array ``:ids`` (SQLite's json_each).
