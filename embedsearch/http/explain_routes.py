"""``/api/explain``: what an AE or VAE kept of a query and of each of its hits, as PNG data URLs.

Beside ``routes.py`` (which is full) and built from its parts: the reader dependency, the decode
slots for uploads and the thread hop. ``app.py`` registers this router after that one.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool as in_thread

from embedsearch.core.explain import Explanation
from embedsearch.engine import Engine
from embedsearch.errors import InvalidArgumentError
from embedsearch.http.routes import ReadEngine, _service, _stored_pixels, client_name
from embedsearch.http.schemas import MAX_ID, ExplainOut

router = APIRouter(prefix="/api")

#: Hits explained in one request: each is a decode (a few ms on a CPU) and a PNG in the answer.
MAX_HITS = 50
_HITS_HELP = f"comma-separated image ids of the hits to explain (at most {MAX_HITS})"


def hit_ids(hits: str) -> list[int]:
    """``"12,7,40"`` -> [12, 7, 40]; anything else is one line saying what is wrong."""
    parts = [p.strip() for p in hits.split(",") if p.strip()]
    if len(parts) > MAX_HITS:
        raise InvalidArgumentError(f"hits: at most {MAX_HITS} ids per request, not {len(parts)}")
    if not all(p.isascii() and p.isdigit() and int(p) <= MAX_ID for p in parts):
        raise InvalidArgumentError("hits: give image ids (whole numbers) separated by commas, e.g. hits=12,7,40")
    return [int(p) for p in parts]


def _data_url(image: np.ndarray) -> str:
    from embedsearch.core.generate import to_png

    return "data:image/png;base64," + base64.b64encode(to_png(image)).decode("ascii")


def _explained(engine: Engine, model: str, query: int | bytes, ids: list[int], **kwargs: Any) -> dict[str, Any]:
    """Explain and encode the PNGs, all in the worker thread (not on the event loop)."""
    return explain_out(engine.explain(model, query, ids, **kwargs))


def explain_out(ex: Explanation) -> dict[str, Any]:
    hits = [
        {
            "id": h.id,
            "reconstruction": _data_url(h.reconstruction),
            "midpoint": None if h.midpoint is None else _data_url(h.midpoint),
        }
        for h in ex.hits
    ]
    return {
        "model": ex.model,
        "query": {"id": ex.query_id, "reconstruction": _data_url(ex.reconstruction)},
        "hits": hits,
    }


@router.get("/explain", response_model=ExplainOut, tags=["search"])
async def explain_image(
    request: Request,
    engine: ReadEngine,
    image_id: Annotated[int, Query(ge=0, le=MAX_ID)],
    model: Annotated[str, Query(description="an AE or VAE model")],
    hits: Annotated[str, Query(max_length=2000, description=_HITS_HELP)] = "",
) -> dict[str, Any]:
    """The model's reconstruction of an indexed image (its stored code decoded) and of each hit, and
    for a VAE the decoded midpoint between the query's code and each hit's. 404 for an unknown id."""
    ids = hit_ids(hits)
    # An image without a code in this model is decoded from its file: held like generate's "near".
    pixels = await in_thread(_stored_pixels, engine, image_id)
    async with _service(request).decodes.held_pixels(pixels):
        return await in_thread(_explained, engine, model, image_id, ids)


@router.post("/explain", response_model=ExplainOut, tags=["search"])
async def explain_upload(
    request: Request,
    engine: ReadEngine,
    file: Annotated[UploadFile, File(description="the query image (not stored)")],
    model: Annotated[str, Form(description="an AE or VAE model")],
    hits: Annotated[str, Form(max_length=2000, description=_HITS_HELP)] = "",
) -> dict[str, Any]:
    """As ``GET /api/explain``, for an uploaded query (encoded, then decoded; ``query.id`` is null)."""
    ids = hit_ids(hits)
    service = _service(request)
    name, limit = client_name(file.filename), service.max_query_pixels
    async with service.decodes.reading([file], limit) as (data,):
        return await in_thread(_explained, engine, model, data, ids, name=name, max_pixels=limit)
