"""Browsing the library over HTTP: pages of images (by label), the labels with their counts, and a
2-D map of a model's vectors. Thin: parse, one Engine call, render; the helpers are routes.py's.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool as in_thread

from embedsearch.core.browse import MAX_PAGE
from embedsearch.http.routes import MAX_FILTER, ReadEngine, file_url, thumb_url
from embedsearch.http.schemas import MAX_ID, ImagePageOut, LabelsOut, MapOut

router = APIRouter(prefix="/api")
#: A model's name is at most this long (the models table's column).
MAX_MODEL_NAME = 64


@router.get("/images", response_model=ImagePageOut, tags=["library"])
async def list_images(
    engine: ReadEngine,
    label: Annotated[str | None, Query(max_length=MAX_FILTER, description="only images with this label")] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 48,
) -> dict[str, Any]:
    """A page of the library's images in the order they were added, with their thumbnails' URLs."""
    page = await in_thread(engine.images, label, offset, limit)
    images = [{**asdict(b), "url": file_url(b.id), "thumb": thumb_url(b.id)} for b in page.images]
    return {"total": page.total, "offset": page.offset, "limit": page.limit, "images": images}


@router.get("/labels", response_model=LabelsOut, tags=["library"])
async def list_labels(engine: ReadEngine) -> dict[str, Any]:
    """Every label with its number of images, most common first (``null``: the unlabelled ones)."""
    return {"labels": [asdict(c) for c in await in_thread(engine.labels)]}


@router.get("/map", response_model=MapOut, tags=["library"])
async def vector_map(
    engine: ReadEngine, model: Annotated[str, Query(min_length=1, max_length=MAX_MODEL_NAME)]
) -> dict[str, Any]:
    """Each stored vector of a model (a seeded sample of at most 3000) projected to 2-D by PCA, with
    its image's label; computed on the server and cached until the model's vectors change."""
    found = await in_thread(engine.vector_map, model)
    return {**asdict(found), "method": "pca"}
