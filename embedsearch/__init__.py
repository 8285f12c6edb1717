"""embedsearch: image similarity search with autoencoder and VAE embeddings over FAISS + SQLite.

from embedsearch import Engine
with Engine("indexes") as engine:
    engine.index("photos/", model="pixels")
    for result in engine.query(["photos/cat.png"], model="pixels", k=5):
        print(result)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedsearch.version import __version__

if TYPE_CHECKING:
    from embedsearch.engine import Engine


def __getattr__(name: str) -> Any:
    # Lazy: ``import embedsearch`` must stay cheap (no FAISS, SQLAlchemy or torch at import time).
    if name == "Engine":
        from embedsearch.engine import Engine

        return Engine
    raise AttributeError(f"module 'embedsearch' has no attribute {name!r}")


__all__ = ["Engine", "__version__"]
