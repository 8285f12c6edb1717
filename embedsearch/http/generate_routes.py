"""Generation over HTTP: candidates from a model's decoder (VAE prior, near an image, or between two
images for an AE or a VAE), each with its nearest indexed images. Thin: one Engine call per request.
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool as in_thread

from embedsearch.engine import Engine
from embedsearch.http.routes import Credentials, ReadEngine, _service, _stored_pixels, _token, hits
from embedsearch.http.schemas import GenerateIn, GenerateOut

router = APIRouter(prefix="/api")


@router.post("/generate", response_model=GenerateOut, tags=["search"])
async def generate(body: GenerateIn, request: Request, credentials: Credentials, engine: ReadEngine) -> dict[str, Any]:
    """New candidates from a model's decoder (VAE prior, near an indexed image, or ``steps`` on the
    path ``between`` two indexed images, which an AE can do too), with their nearest indexed images
    when ``search`` > 0. ``add`` stores them (a write: needs the token).
    """
    if body.add:
        _service(request).authorize(_token(credentials), write=True)
    sources = [body.near] if body.near is not None else list(body.between or [])
    pixels = 0
    for image_id in sources:
        pixels += await in_thread(_stored_pixels, engine, image_id)
    async with _service(request).decodes.held_pixels(pixels):  # "near" and "between" decode stored images
        return await in_thread(_generate, engine, body)


def _generate(engine: Engine, body: GenerateIn) -> dict[str, Any]:
    from embedsearch.core.generate import to_png

    out = engine.generate(
        body.model,
        n=body.n,
        seed=body.seed,
        temperature=body.temperature,
        near=body.near,
        spread=body.spread,
        between=(body.between[0], body.between[1]) if body.between else None,
        steps=body.steps,
        search_k=body.search,
        add=body.add,
    )
    candidates = [
        {
            "index": c.index,
            "latent": c.latent,
            "id": c.id,
            "neighbours": hits(c.neighbours),
            "image": "data:image/png;base64," + base64.b64encode(to_png(c.image)).decode("ascii"),
        }
        for c in out.candidates
    ]
    return {"model": out.model, "mode": out.mode, "seed": out.seed, "candidates": candidates}
