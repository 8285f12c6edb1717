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
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str | None] = mapped_column(String, unique=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String, index=True)
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
    checkpoint_path: Mapped[str | None] = mapped_column(String)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
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


#: id, path and label of the images whose ids are in the JSON array ``:ids`` (SQLite's json_each).
