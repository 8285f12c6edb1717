"""New candidate images from a model's decoder: from the VAE prior, near an image, or between two.

The VAE learned a distribution over codes (a standard normal prior, and a Gaussian q(z|x) around
each image), so it can be sampled; a plain AE only learned a map from images to codes and back, so
for it only the path between two images' codes makes sense.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from embedsearch.errors import DataError, InvalidArgumentError, ModelError

if TYPE_CHECKING:
    from embedsearch.engine import Engine, Neighbour

log = logging.getLogger(__name__)

MODES = ("prior", "near", "between")
_NO_PRIOR = (
    "model {name!r} is a plain autoencoder: it learns codes, not a distribution over them, so it has "
    "no prior to sample from and no spread around an image; use a VAE model, or --between A B"
)


@dataclass
class Candidate:
    index: int
    image: np.ndarray  # (S, S, C) uint8
    latent: list[float]
    neighbours: list[Neighbour] = field(default_factory=list)
    id: int | None = None  # set once stored with --add

    @property
    def caption(self) -> str:
        return f"#{self.index}" + (f" id {self.id}" if self.id is not None else "")


@dataclass
class Generation:
    model: str
    mode: str
    seed: int
    settings: dict[str, Any]
    sources: list[str]
    candidates: list[Candidate]

    def provenance(self, candidate: Candidate) -> dict[str, Any]:
        return {
            "model": self.model,
            "mode": self.mode,
            "seed": self.seed,
            "index": candidate.index,
            "sources": self.sources,
            **self.settings,
        }


def to_png(image: np.ndarray) -> bytes:
    """(S, S, C) uint8 -> PNG bytes."""
    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def interpolate(za: np.ndarray, zb: np.ndarray, steps: int, slerp: bool = False) -> np.ndarray:
    """(dim,), (dim,) -> (steps, dim): the straight (or great-circle) path from za to zb, both ends included."""
    t = np.linspace(0.0, 1.0, steps, dtype=np.float64)[:, None]  # (steps, 1)
    a, b = za.astype(np.float64), zb.astype(np.float64)
    if slerp:
        cos = np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)
        omega = np.arccos(np.clip(cos, -1.0, 1.0))
        if omega > 1e-6:  # (nearly) parallel codes: the great circle is the straight line
            path = (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
            path[0], path[-1] = a, b  # exact endpoints despite rounding
            return path.astype(np.float32)
    return ((1 - t) * a + t * b).astype(np.float32)


def _source_pixels(engine: Engine, source: str | int, spec: Any) -> tuple[np.ndarray, str]:
    """(1, S, S, C) uint8 of an image given as a file path or an indexed image id."""
    from embedsearch.data.images import decode_file

    if isinstance(source, int) or (isinstance(source, str) and source.isdigit() and not Path(source).exists()):
        path, _ = engine.image_file(int(source))
        name = f"id:{int(source)}"
    else:
        path, name = Path(source), str(source)
        if not path.is_file():
            raise DataError(f"{source}: no such image file")
    return decode_file(str(path), spec, engine.max_pixels)[1][None], name


def sample_latents(
    engine: Engine,
    model: str,
    n: int,
    seed: int,
    temperature: float,
    near: str | int | None,
    spread: float,
    between: tuple[str | int, str | int] | None,
    steps: int,
    slerp: bool,
) -> tuple[str, np.ndarray, list[str]]:
    """(mode, (N, dim) codes, source names) for one request."""
    encoder = engine.encoder(model)
    kind = engine.model(model).kind
    if not hasattr(encoder, "decode"):
        raise ModelError(f"model {model!r} ({kind}) has no decoder; generate with an AE or VAE model")
    if near is not None and between is not None:
        raise InvalidArgumentError("choose --near or --between, not both")
    rng = np.random.default_rng(seed)
    if between is not None:
        if steps < 2:
            raise InvalidArgumentError("--steps must be at least 2 (the two ends)")
        (xa, na), (xb, nb) = (_source_pixels(engine, s, encoder.spec) for s in between)
        za, zb = encoder.encode(np.concatenate([xa, xb]))  # (dim,) each
        return "between", interpolate(za, zb, steps, slerp), [na, nb]
    if kind != "vae":
        raise ModelError(_NO_PRIOR.format(name=model))
    if n < 1:
        raise InvalidArgumentError("-n must be at least 1")
    eps = rng.standard_normal((n, encoder.dim)).astype(np.float32)  # (N, dim)
    if near is None:
        return "prior", temperature * eps, []
    x, name = _source_pixels(engine, near, encoder.spec)
    mu, logvar = encoder.encode_dist(x)  # (1, dim) each
    return "near", mu + spread * np.exp(0.5 * logvar) * eps, [name]


def generate(
    engine: Engine,
    model: str,
    n: int = 16,
    seed: int = 0,
    temperature: float = 1.0,
    near: str | int | None = None,
    spread: float = 1.0,
    between: tuple[str | int, str | int] | None = None,
    steps: int = 8,
    slerp: bool = False,
    search_k: int = 0,
    add: bool = False,
    include_generated: bool = False,
) -> Generation:
    """Decode candidates, optionally find their nearest indexed images and store them as generated."""
    mode, z, sources = sample_latents(engine, model, n, seed, temperature, near, spread, between, steps, slerp)
    encoder = engine.encoder(model)
    images = encoder.decode(z)  # (N, S, S, C) uint8
    settings = (
        {"temperature": temperature}
        if mode == "prior"
        else {"spread": spread}
        if mode == "near"
        else {"steps": steps, "slerp": slerp}
    )
    out = Generation(
        model,
        mode,
        seed,
        settings,
        sources,
        [Candidate(i, img, [float(v) for v in zi]) for i, (img, zi) in enumerate(zip(images, z, strict=False))],
    )
    if search_k > 0:
        vectors = encoder.encode(images)  # what --add would index: the candidate image's own code
        for cand, hits in zip(
            out.candidates, engine.search_vectors(vectors, model, search_k, include_generated), strict=False
        ):
            cand.neighbours = hits
    if add:
        engine.add_generated(out)
    return out


def write_candidates(generation: Generation, out: Path) -> list[Path]:
    """One PNG per candidate plus a JSON sidecar (model, mode, seed, latent vector, neighbours)."""
    import json
    from dataclasses import asdict

    from embedsearch.core.vectors import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for cand in generation.candidates:
        stem = out / f"{generation.model}-{generation.mode}-seed{generation.seed}-{cand.index:03d}"
        atomic_write(stem.with_suffix(".png"), to_png(cand.image))
        sidecar = {
            **generation.provenance(cand),
            "latent": cand.latent,
            "id": cand.id,
            "neighbours": [asdict(n) for n in cand.neighbours],
        }
        atomic_write(stem.with_suffix(".json"), (json.dumps(sidecar, indent=2) + "\n").encode())
        written.append(stem.with_suffix(".png"))
    return written


def candidates_grid(generation: Generation, path: Path, columns: int = 8) -> Path:
    """Candidates in rows of ``columns``, each captioned, its nearest real images under it."""
    from embedsearch.render.grid import Tile, save_grid
    from embedsearch.render.pictures import image_tile

    rows: list[list[Tile]] = []
    cands = generation.candidates
    for start in range(0, len(cands), columns):
        block = cands[start : start + columns]
        rows.append(
            [
                Tile(Image.fromarray(c.image.squeeze(-1) if c.image.shape[-1] == 1 else c.image), c.caption)
                for c in block
            ]
        )
        depth = max((len(c.neighbours) for c in block), default=0)
        for r in range(depth):
            rows.append(
                [
                    image_tile(c.neighbours[r].path, f"{c.neighbours[r].label or ''} {c.neighbours[r].distance:.2f}")
                    if r < len(c.neighbours)
                    else Tile(None, "")
                    for c in block
                ]
            )
    return save_grid(rows, path)
