"""Encoders: a batch of normalised images in, one float32 vector per image out.

Every kind (pixels, pca, ae, vae) implements :class:`Encoder`. The registry maps a kind to the
dotted path of its class so that looking a kind up never imports torch unless that kind needs it.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from embedsearch.data.images import InputSpec
from embedsearch.errors import InvalidArgumentError, ModelError

#: kind -> "module:Class". Torch-based kinds live in modules that import torch; the others do not.
REGISTRY: dict[str, str] = {
    "pixels": "embedsearch.encoders.base:PixelsEncoder",
    "pca": "embedsearch.encoders.base:PCAEncoder",
    "ae": "embedsearch.encoders.nn.encoder:AEEncoder",
    "vae": "embedsearch.encoders.nn.encoder:VAEEncoder",
}
WEIGHTS_FILE = "weights.safetensors"


def encoder_class(kind: str) -> type[Encoder]:
    try:
        module, _, name = REGISTRY[kind].partition(":")
    except KeyError:
        raise InvalidArgumentError(f"unknown model kind {kind!r}; choose one of {', '.join(REGISTRY)}") from None
    return getattr(importlib.import_module(module), name)


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """(N, S, S, C) uint8 -> (N, S*S*C) float32 in [0, 1], C-contiguous."""
    flat = images.reshape(len(images), -1)
    return np.multiply(flat, np.float32(1.0 / 255.0), dtype=np.float32)


@dataclass
class Options:
    """Base of each kind's training options (a typed dataclass that round-trips to JSON)."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Options:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidArgumentError(f"options {', '.join(unknown)} do not apply to this model kind")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Encoder(ABC):
    """The interface every model kind implements.

    ``encode`` takes ``(N, S, S, C)`` uint8 images already normalised to ``spec`` and returns
    ``(N, dim)`` float32, C-contiguous. AE gives its latent code z, VAE its mean vector mu.
    """

    kind: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    #: False for kinds that need no data to exist (pixels): they are created on first use.
    needs_training: ClassVar[bool] = True

    def __init__(self, spec: InputSpec, dim: int, options: Options) -> None:
        self.spec = spec
        self.dim = dim
        self.options = options

    @abstractmethod
    def encode(self, images: np.ndarray) -> np.ndarray: ...

    @classmethod
    @abstractmethod
    def fit(cls, images: np.ndarray, spec: InputSpec, options: Options, workdir: Path, resume: bool = False) -> Encoder:
        """Train on ``(N, S, S, C)`` uint8 images.

        ``workdir`` is the model's own folder: a kind that trains for long keeps its checkpoints
        there, and ``resume=True`` continues from them.
        """

    def sharing_cores(self) -> AbstractContextManager[None]:
        """A context for encoding while worker processes keep every core busy (a bulk run's decoding).

        A kind whose runtime spreads one call over several threads encodes on one thread there:
        each parallel step would otherwise wait for a thread the workers have pushed off its core.
        """
        return nullcontext()

    def save(self, directory: Path) -> Path | None:
        """Write weights into ``directory``; return the weights file (None: this kind has none)."""
        return None

    @classmethod
    def load(cls, directory: Path, spec: InputSpec, dim: int, options: Options) -> Encoder:
        return cls(spec, dim, options)

    def summary(self) -> dict[str, Any]:
        """Extra facts for the model's config.json (losses, epochs ...)."""
        return {}


class PixelsEncoder(Encoder):
    """The resized image itself, flattened: the baseline that needs no training."""

    kind = "pixels"
    needs_training = False

    def encode(self, images: np.ndarray) -> np.ndarray:
        return to_unit_float(images)  # (N, S*S*C)

    @classmethod
    def fit(
        cls, images: np.ndarray, spec: InputSpec, options: Options, workdir: Path, resume: bool = False
    ) -> PixelsEncoder:
        return cls(spec, spec.image_size**2 * spec.channels, options)


@dataclass
class PCAOptions(Options):
    dim: int = 32
    seed: int = 0


class PCAEncoder(Encoder):
    """Principal components of the flattened pixels: the linear baseline."""

    kind = "pca"
    Options = PCAOptions

    def __init__(
        self,
        spec: InputSpec,
        dim: int,
        options: Options,
        mean: np.ndarray | None = None,
        components: np.ndarray | None = None,
    ) -> None:
        super().__init__(spec, dim, options)
        self.mean = mean  # (D,)
        self.components = components  # (dim, D)

    def encode(self, images: np.ndarray) -> np.ndarray:
        if self.mean is None or self.components is None:
            raise ModelError("this PCA model has no weights; train it first")
        x = to_unit_float(images)  # (N, D)
        x -= self.mean
        return np.ascontiguousarray(x @ self.components.T)  # (N, dim)

    @classmethod
    def fit(
        cls, images: np.ndarray, spec: InputSpec, options: Options, workdir: Path, resume: bool = False
    ) -> PCAEncoder:
        if not isinstance(options, PCAOptions):
            raise InvalidArgumentError("PCA takes PCAOptions")
        x = to_unit_float(images)  # (N, D)
        n, d = x.shape
        if not 1 <= options.dim <= min(n, d):
            raise InvalidArgumentError(f"--dim must be between 1 and {min(n, d)} for {n} images of {d} values")
        mean = x.mean(axis=0)
        x -= mean
        components = _top_components(x, options.dim, options.seed)
        # Contiguous copies: safetensors writes an array's raw buffer, so a strided view would be garbled.
        return cls(
            spec,
            options.dim,
            options,
            np.ascontiguousarray(mean, dtype=np.float32),
            np.ascontiguousarray(components, dtype=np.float32),
        )

    def save(self, directory: Path) -> Path:
        from safetensors.numpy import save_file

        path = directory / WEIGHTS_FILE
        if self.mean is None or self.components is None:
            raise ModelError("this PCA model has no weights to save")
        save_file(
            {"mean": np.ascontiguousarray(self.mean), "components": np.ascontiguousarray(self.components)}, str(path)
        )
        return path

    @classmethod
    def load(cls, directory: Path, spec: InputSpec, dim: int, options: Options) -> PCAEncoder:
        from safetensors.numpy import load_file

        tensors = load_file(str(directory / WEIGHTS_FILE))
        return cls(spec, dim, options, tensors["mean"], np.ascontiguousarray(tensors["components"]))


def _top_components(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The k leading right singular vectors of centred ``x`` (N, D) -> (k, D), sign-fixed."""
    n, d = x.shape
    if d <= 2048:  # many images of few pixels (28x28 grey): eigenvectors of the D x D covariance
        _, vecs = np.linalg.eigh((x.T @ x).astype(np.float64))  # (D, D), ascending eigenvalues
        comps = vecs[:, ::-1][:, :k].T  # (k, D)
    elif n <= 2048:  # few images of many pixels: SVD of the N x D data itself
        comps = np.linalg.svd(x, full_matrices=False)[2][:k]
    else:
        # Randomised SVD (Halko et al. 2011): exact enough for k << D and far cheaper than eigh.
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(x @ rng.standard_normal((d, k + 10), dtype=np.float32))  # (N, k+10)
        for _ in range(4):
            q, _ = np.linalg.qr(x @ (x.T @ q))
        comps = np.linalg.svd(q.T @ x, full_matrices=False)[2][:k]  # (k, D)
    # Make the largest-magnitude loading of each component positive, so results are deterministic.
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    return comps * signs[:, None]


def write_config(directory: Path, config: dict[str, Any]) -> None:
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
