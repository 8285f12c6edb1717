"""The routes of the HTTP API: each parses its request, calls one Engine method and renders JSON.

Errors are the package's own exceptions; ``service.py`` maps them to statuses centrally. The routes
are ``async`` and hand the engine call to the thread pool themselves (``in_thread``): one thread hop
per request, where a plain ``def`` route would take a second one to validate its response.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import fields
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool as in_thread
from starlette.exceptions import HTTPException

from embedsearch.core.thumbs import SIZES as THUMB_SIZES
from embedsearch.engine import Engine
from embedsearch.errors import ImageError, NotFoundError
from embedsearch.http.schemas import (
    MAX_GROUPS,
    MAX_ID,
    MAX_K,
    Deleted,
    DuplicatesOut,
    HealthOut,
    ImageOut,
    ModelOut,
    ModelsOut,
    SearchOut,
    StatsOut,
    UploadOut,
)
from embedsearch.http.security import public_text
from embedsearch.http.state import Service
from embedsearch.results import Thumbnail
from embedsearch.version import __version__

if TYPE_CHECKING:
    from embedsearch.results import ImageRecord, Neighbour, QueryResult

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api")
bearer = HTTPBearer(auto_error=False, description="The service's token, when it was started with one.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
ImageId = Annotated[int, Path(ge=0, le=MAX_ID, description="image id")]


def _service(request: Request) -> Service:
    return request.app.state.service


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials is not None else None


async def _inside(
    request: Request, credentials: HTTPAuthorizationCredentials | None, write: bool
) -> AsyncIterator[Engine]:
    """Check the token, then hold the engine's gate for the request (async: no thread hop)."""
    service = _service(request)
    service.authorize(_token(credentials), write=write)
    await service.gate.enter()
    try:
        yield service.engine
    finally:
        service.gate.leave()


async def reader(request: Request, credentials: Credentials) -> AsyncIterator[Engine]:
    async for engine in _inside(request, credentials, write=False):
        yield engine


async def writer(request: Request, credentials: Credentials) -> AsyncIterator[Engine]:
    async for engine in _inside(request, credentials, write=True):
        yield engine


ReadEngine = Annotated[Engine, Depends(reader)]
WriteEngine = Annotated[Engine, Depends(writer)]


def file_url(image_id: int) -> str:
    return f"/api/images/{image_id}/file"


def thumb_url(image_id: int) -> str:
    return f"/api/images/{image_id}/thumb"


def hits(neighbours: list[Neighbour]) -> list[dict[str, Any]]:
    return [
        {
            "rank": n.rank,
            "id": n.id,
            "label": n.label,
            "distance": n.distance,
            "url": file_url(n.id),
            "thumb": thumb_url(n.id),
            "name": PurePosixPath(n.path).name if n.path else None,
        }
        for n in neighbours
    ]


def search_out(found: QueryResult) -> dict[str, Any]:
    """A query's neighbours as ``SearchOut``, with how unusual the query is for the model."""
    return {
        "model": found.model,
        "results": hits(found.results),
        "ood_percentile": found.ood_percentile,
        "warning": found.warning,
    }


def image_out(record: ImageRecord) -> dict[str, Any]:
    """An ImageRecord as ``ImageOut``: its fields, with ``path`` replaced by the file's name and URL."""
    out: dict[str, Any] = {}
    for f in fields(record):
        if f.name == "path":
            out["name"] = PurePosixPath(record.path).name if record.path else None
            out["url"] = file_url(record.id)
        elif f.name == "provenance" and record.provenance and "sources" in record.provenance:
            # 'generate --near FILE' records the file's path; the server's folders are not shown
            sources = [PurePosixPath(s).name for s in record.provenance["sources"]]
            out["provenance"] = {**record.provenance, "sources": sources}
        else:
            out[f.name] = getattr(record, f.name)
    return out


def _stored_pixels(engine: Engine, image_id: int) -> int:
    """Width x height of a stored image (0 if there is none: the engine reports that in its own order);
    for the decode slots of the routes that decode a stored image (generate near/between, explain)."""
    try:
        record = engine.image(image_id)
    except NotFoundError:
        return 0
    return record.width * record.height


def client_name(filename: str | None) -> str:
    """The client's file name for messages and echoes only: last component, no control characters."""
    name = PurePosixPath((filename or "").replace("\\", "/")).name
    return re.sub(r"[\x00-\x1f\x7f]", "", name)[:200] or "upload"


def model_list(models: str | None) -> list[str] | None:
    names = [m.strip() for m in (models or "").split(",") if m.strip()]
    return names or None


# -- images ---------------------------------------------------------------------------------------


@router.post("/images", response_model=UploadOut, tags=["images"])
async def upload_images(
    request: Request,
    engine: WriteEngine,
    files: Annotated[list[UploadFile], File(description="one or more image files")],
    label: Annotated[str | None, Form(max_length=200)] = None,
    models: Annotated[str | None, Form(description="comma-separated model names (default: every model)")] = None,
) -> dict[str, Any]:
    """Store images by content hash and index them into every model (or those named).

    An image stored already returns its existing id (``created`` false). With several files, the
    ones that are not usable images are listed under ``errors`` and the others are still stored;
    a single bad file (or a request where every file is bad) is answered with 415 or 422.
    """
    async with _service(request).decodes.reading(files, engine.max_pixels) as images:
        contents = [(client_name(f.filename), data) for f, data in zip(files, images, strict=True)]
        return await in_thread(_add_all, engine, contents, label or None, model_list(models))


def _add_all(
    engine: Engine, contents: list[tuple[str, bytes]], label: str | None, models: list[str] | None
) -> dict[str, Any]:
    images, errors = [], []
    for name, data in contents:
        try:
            added = engine.add_image(data, label, models, name)
        except ImageError as exc:
            errors.append((name, exc))
            continue
        images.append({"id": added.id, "sha256": added.sha256, "created": added.created, "filename": name})
    if not images and errors:
        raise errors[0][1]
    shown = [{"filename": n, "error": public_text(str(e), engine.home)} for n, e in errors]
    return {"images": images, "errors": shown}


@router.get("/images/{image_id}", response_model=ImageOut, tags=["images"])
async def get_image(image_id: ImageId, engine: ReadEngine) -> dict[str, Any]:
    """An image's metadata (its server-side folder is not shown)."""
    return image_out(await in_thread(engine.image, image_id))


@router.get(
    "/images/{image_id}/file",
    response_class=Response,
    tags=["images"],
    responses={200: {"content": {"image/*": {}}, "description": "the image's bytes"}},
)
async def get_image_file(image_id: ImageId, engine: ReadEngine) -> Response:
    """The image's bytes as they were indexed (404 if the file changed since), with their content type."""
    data, content_type = await in_thread(engine.image_bytes, image_id)
    return Response(data, media_type=content_type)


def _thumb_size(size: int) -> int:
    if size not in THUMB_SIZES:
        raise ValueError(f"size must be one of {', '.join(map(str, THUMB_SIZES))}")
    return size


#: A year: the longest max-age caches honour. Only for a URL that names the content (``?v=``).
_IMMUTABLE = "private, max-age=31536000, immutable"


@router.get(
    "/images/{image_id}/thumb",
    response_class=Response,
    tags=["images"],
    responses={
        200: {"content": {"image/webp": {}, "image/*": {}}, "description": "the thumbnail"},
        304: {"description": "the thumbnail named in If-None-Match is still this image's"},
    },
)
async def get_image_thumb(
    image_id: ImageId,
    engine: ReadEngine,
    request: Request,
    size: Annotated[
        int, Query(description="longer side at most this: 128, 256 or 512"), AfterValidator(_thumb_size)
    ] = 256,
    v: Annotated[str | None, Query(max_length=64, description="the image's sha256 (or a prefix)")] = None,
) -> Response:
    """A small WebP of the image (an image already that small: itself), made from its bytes as they
    were indexed (404 if the file changed since and none was made before) and cached by content hash.

    ETag names the content; revalidation (If-None-Match) is answered 304 without reading the file.
    An image id keeps its number when a changed file is indexed again, so the plain URL must be
    revalidated (``no-cache``); with ``?v=`` naming the image's sha256 (8+ hex digits) it is immutable.
    """
    found, etag = await in_thread(_thumbnail, engine, image_id, size, request.headers.get("if-none-match"))
    versioned = v is not None and len(v) >= 8 and etag.strip('"').startswith(v.lower())
    headers = {"ETag": etag, "Cache-Control": _IMMUTABLE if versioned else "private, no-cache"}
    if found is None:
        return Response(status_code=304, headers=headers)
    return Response(found.data, media_type=found.media_type, headers=headers)


def _thumbnail(engine: Engine, image_id: int, size: int, if_none_match: str | None) -> tuple[Thumbnail | None, str]:
    """The thumbnail and its ETag; None (304) when If-None-Match names it, known from the record alone."""
    if if_none_match:
        etag = Thumbnail.etag_of(engine.image(image_id).sha256, size)
        asked = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
        if etag in asked or "*" in asked:
            return None, etag
    found = engine.thumbnail(image_id, size)
    return found, found.etag


@router.delete("/images/{image_id}", response_model=Deleted, tags=["images"])
async def delete_image(image_id: ImageId, engine: WriteEngine) -> dict[str, Any]:
    """Forget an image: metadata, vectors in every model, and the stored file of an upload."""
    await in_thread(engine.delete_image, image_id)
    return {"id": image_id, "deleted": True}


# -- search -------------------------------------------------------------------------------------
#: Longest label or folder a search may filter by (a label is at most a folder name; a path, a path).
MAX_FILTER = 4096


@router.post("/search", response_model=SearchOut, tags=["search"])
async def search_upload(
    request: Request,
    engine: ReadEngine,
    file: Annotated[UploadFile, File(description="the query image (not stored)")],
    model: Annotated[str, Form()],
    k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
    label: Annotated[str | None, Form(max_length=MAX_FILTER, description="only images with this label")] = None,
    under: Annotated[str | None, Form(max_length=MAX_FILTER, description="only files under this folder")] = None,
) -> dict[str, Any]:
    """The indexed images nearest to an uploaded image, nearest first (optionally only those with a
    label, or whose file is under a folder)."""
    service = _service(request)
    name, limit = client_name(file.filename), service.max_query_pixels
    async with service.decodes.reading([file], limit) as (data,):
        found = await in_thread(
            engine.query_bytes, data, model, k, name=name, max_pixels=limit, label=label, under=under
        )
    return search_out(found)


@router.get("/search", response_model=SearchOut, tags=["search"])
async def search_image(
    engine: ReadEngine,
    image_id: Annotated[int, Query(ge=0, le=MAX_ID)],
    model: Annotated[str, Query()],
    k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    label: Annotated[str | None, Query(max_length=MAX_FILTER, description="only images with this label")] = None,
    under: Annotated[str | None, Query(max_length=MAX_FILTER, description="only files under this folder")] = None,
) -> dict[str, Any]:
    """The indexed images nearest to an indexed image (itself first, if it passes the filters), from
    its stored vector."""
    found = await in_thread(engine.query_image, image_id, model, k, label=label, under=under)
    return search_out(found)


#: One duplicates search at a time: it reads the whole index (seconds on a large library).
_GROUPING = threading.Semaphore(1)


@router.get("/duplicates", response_model=DuplicatesOut, tags=["search"])
async def duplicates(
    engine: ReadEngine,
    model: Annotated[str, Query()],
    threshold: Annotated[float | None, Query(ge=0, le=1e9, description="default: calibrated")] = None,
    k: Annotated[int | None, Query(ge=1, le=100, description="mutual k-NN instead of a threshold")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_GROUPS, description="groups returned, largest first")] = 100,
) -> dict[str, Any]:
    """Groups of near-duplicate indexed images (see ``embedsearch duplicates``); 503 while another runs."""
    if not _GROUPING.acquire(blocking=False):
        raise HTTPException(503, "another duplicates search is running; try again shortly", {"Retry-After": "5"})
    try:
        report = await in_thread(engine.duplicates, model, threshold, k)
    finally:
        _GROUPING.release()
    out = report.to_dict()
    groups = [
        {"group": g.group, "images": [{"id": i.id, "name": PurePosixPath(i.path).name if i.path else None,
         "distance": i.distance, "url": file_url(i.id), "thumb": thumb_url(i.id)} for i in g.images]}
        for g in report.groups[:limit]
    ]  # fmt: skip
    return {**out, "total_groups": len(report.groups), "groups": groups}


# -- the library --------------------------------------------------------------------------------


@router.get("/models", response_model=ModelsOut, tags=["library"])
async def list_models(engine: ReadEngine) -> dict[str, Any]:
    """The library's models (name, kind ae/vae/pixels/pca/phash/dhash, input, dimension, vectors)."""
    shown = [f.name for f in fields(ModelOut)]  # the ModelSummary part of each ModelInfo
    return {"models": [{f: getattr(m, f) for f in shown} for m in await in_thread(engine.models)]}


@router.get("/stats", response_model=StatsOut, tags=["library"])
async def stats(engine: ReadEngine) -> dict[str, Any]:
    """Counts: images, generated images, models, vectors per model."""
    return await in_thread(engine.stats)


@router.get("/health", response_model=HealthOut, tags=["library"])
async def health() -> dict[str, Any]:
    """Liveness; always open, even with --token-for-reads. ``pid``: the process that answered
    (``serve --workers N`` runs N of them)."""
    return {"status": "ok", "version": __version__, "pid": os.getpid()}
