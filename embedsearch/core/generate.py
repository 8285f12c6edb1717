"""New candidate images from a model's decoder: from the VAE prior, near an image, or between two.

The VAE learned a distribution over codes (a standard normal prior, and a Gaussian q(z|x) around
each image), so it can be sampled; a plain AE only learned a map from images to codes and back, so
for it only the path between two images' codes makes sense.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedsearch.core.library import ImageLibrary, NewImage
from embedsearch.core.models import ModelRegistry
from embedsearch.core.search import Search
from embedsearch.data.images import InputSpec, decode_bytes, decode_file, to_pil
from embedsearch.encoders.base import DecodingEncoder, PosteriorEncoder
from embedsearch.errors import DataError, InvalidArgumentError, ModelError
from embedsearch.files import atomic_write
from embedsearch.results import Neighbour

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
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class GenerateRequest:
    """What to generate: ``n`` codes from the prior, near an image, or ``steps`` between two."""

    n: int = 16
    seed: int = 0
    temperature: float = 1.0
    near: str | int | None = None
    spread: float = 1.0
    between: tuple[str | int, str | int] | None = None
    steps: int = 8
    slerp: bool = False
    search_k: int = 0
    add: bool = False
    include_generated: bool = False


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


class Generator:
    """Samples codes, decodes them, finds their neighbours and stores them on request."""

    def __init__(self, registry: ModelRegistry, library: ImageLibrary, search: Search, max_pixels: int) -> None:
        self.registry = registry
        self.library = library
        self.search = search
        self.max_pixels = max_pixels

    def _decoder(self, model: str) -> DecodingEncoder:
        encoder = self.registry.encoder(model)
        if not isinstance(encoder, DecodingEncoder):
            kind = self.registry.model(model).kind
            raise ModelError(f"model {model!r} ({kind}) has no decoder; generate with an AE or VAE model")
        return encoder

    def _source_pixels(self, source: str | int, spec: InputSpec) -> tuple[np.ndarray, str]:
        """(1, S, S, C) uint8 of an image given as a file path or an indexed image id."""
        if isinstance(source, int) or (source.isdigit() and not Path(source).exists()):
            name = f"id:{int(source)}"  # the indexed bytes only: never what a path points to now
            return decode_bytes(self.library.image_bytes(int(source))[0], spec, name, self.max_pixels)[1][None], name
        path, name = Path(source), str(source)
        if not path.is_file():
            raise DataError(f"{source}: no such image file")
        return decode_file(str(path), spec, self.max_pixels)[1][None], name

    def sample_latents(self, model: str, request: GenerateRequest) -> tuple[str, np.ndarray, list[str]]:
        """(mode, (N, dim) codes, source names) for one request."""
        encoder = self._decoder(model)
        r = request
        if r.near is not None and r.between is not None:
            raise InvalidArgumentError("choose --near or --between, not both")
        if r.between is not None:
            if r.steps < 2:
                raise InvalidArgumentError("--steps must be at least 2 (the two ends)")
            (xa, na), (xb, nb) = (self._source_pixels(s, encoder.spec) for s in r.between)
            za, zb = encoder.encode(np.concatenate([xa, xb]))  # (dim,) each
            return "between", interpolate(za, zb, r.steps, r.slerp), [na, nb]
        if not isinstance(encoder, PosteriorEncoder):
            raise ModelError(_NO_PRIOR.format(name=model))
        if r.n < 1:
            raise InvalidArgumentError("-n must be at least 1")
        rng = np.random.default_rng(r.seed)
        eps = rng.standard_normal((r.n, encoder.dim)).astype(np.float32)  # (N, dim)
        if r.near is None:
            return "prior", r.temperature * eps, []
        x, name = self._source_pixels(r.near, encoder.spec)
        mu, logvar = encoder.encode_dist(x)  # (1, dim) each
        return "near", mu + r.spread * np.exp(0.5 * logvar) * eps, [name]

    def generate(self, model: str, request: GenerateRequest) -> Generation:
        """Decode candidates, optionally find their nearest indexed images and store them as generated."""
        mode, z, sources = self.sample_latents(model, request)
        encoder = self._decoder(model)
        images = encoder.decode(z)  # (N, S, S, C) uint8
        r = request
        by_mode: dict[str, dict[str, Any]] = {
            "prior": {"temperature": r.temperature},
            "near": {"spread": r.spread},
            "between": {"steps": r.steps, "slerp": r.slerp},
        }
        settings = by_mode[mode]
        candidates = [
            Candidate(i, img, [float(v) for v in zi]) for i, (img, zi) in enumerate(zip(images, z, strict=True))
        ]
        out = Generation(model, mode, r.seed, settings, sources, candidates)
        if r.search_k > 0:
            vectors = encoder.encode(images)  # what --add would index: the candidate image's own code
            found = self.search.vectors(vectors, model, r.search_k, r.include_generated)
            for cand, hits in zip(out.candidates, found, strict=True):
                cand.neighbours = hits
        if r.add:
            stored = [NewImage(to_png(c.image), c.image, out.provenance(c)) for c in out.candidates]
            for cand, image_id in zip(out.candidates, self.library.add_generated(model, stored), strict=True):
                cand.id = image_id
        return out


def write_candidates(generation: Generation, out: Path) -> list[Path]:
    """One PNG per candidate plus a JSON sidecar (model, mode, seed, latent vector, neighbours)."""
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
