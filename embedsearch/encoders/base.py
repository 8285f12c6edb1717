"""Encoders: a batch of normalised images in, one code per image out (float32, or bits for hashes).

Every kind (pixels, pca, ae, vae, phash, dhash) implements :class:`Encoder`; a kind that can also
decode (AE) implements :class:`DecodingEncoder`, one with a Gaussian posterior (VAE)
:class:`PosteriorEncoder`, and one whose code is bits (the perceptual hashes) :class:`BinaryEncoder`,
so callers ask ``isinstance`` (or the class's ``metrics`` and ``code_dtype``) for a capability
instead of naming kinds.
The registry maps a kind to the dotted path of its class so that looking a kind up never imports
torch unless that kind needs it. The classic kinds live in :mod:`embedsearch.encoders.classic`,
the neural ones in :mod:`embedsearch.encoders.nn`.
"""

from __future__ import annotations

import errno
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from embedsearch.data.images import InputSpec
from embedsearch.errors import InvalidArgumentError, from_os_error, os_errors
from embedsearch.files import atomic_path, atomic_write
from embedsearch.results import BINARY_METRICS, FLOAT_METRICS, METRICS

#: kind -> "module:Class". Torch-based kinds live in modules that import torch; the others do not.
REGISTRY: dict[str, str] = {
    "pixels": "embedsearch.encoders.classic:PixelsEncoder",
    "pca": "embedsearch.encoders.classic:PCAEncoder",
    "ae": "embedsearch.encoders.nn.encoder:AEEncoder",
    "vae": "embedsearch.encoders.nn.encoder:VAEEncoder",
    "phash": "embedsearch.encoders.hashes:PHashEncoder",
    "dhash": "embedsearch.encoders.hashes:DHashEncoder",
}
WEIGHTS_FILE = "weights.safetensors"


def encoder_class(kind: str) -> type[Encoder]:
    try:
        module, _, name = REGISTRY[kind].partition(":")
    except KeyError:
        raise InvalidArgumentError(f"unknown model kind {kind!r}; choose one of {', '.join(REGISTRY)}") from None
    return getattr(importlib.import_module(module), name)


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


#: In :class:`Encoder`'s body ``Options`` is the class attribute (the kind's options class), so
#: signatures name the module-level base class through this alias.
EncoderOptions = Options


class Encoder(ABC):
    """The interface every model kind implements.

    ``encode`` takes ``(N, S, S, C)`` uint8 images already normalised to ``spec`` and returns
    ``(N, dim)`` float32, C-contiguous. AE gives its latent code z, VAE its mean vector mu.
    (A :class:`BinaryEncoder` returns packed bits instead.)
    """

    kind: ClassVar[str]
    Options: ClassVar[type[EncoderOptions]] = EncoderOptions
    #: False for kinds that need no data to exist (pixels): they are created on first use.
    needs_training: ClassVar[bool] = True
    #: The distances its codes can be searched with; the first is the default.
    metrics: ClassVar[tuple[str, ...]] = FLOAT_METRICS
    #: The type of one code's values, as the index and the database's vector blobs hold them.
    code_dtype: ClassVar[np.dtype[Any]] = np.dtype(np.float32)

    def __init__(self, spec: InputSpec, dim: int, options: EncoderOptions) -> None:
        self.spec = spec
        self.dim = dim
        self.options = options

    @property
    def code_width(self) -> int:
        """Values in one image's code: the columns ``encode`` returns."""
        return self.dim

    @property
    def code_bytes(self) -> int:
        """Bytes of one image's code in the index and in the database."""
        return self.code_width * self.code_dtype.itemsize

    @classmethod
    def choose_metric(cls, metric: str | None) -> str:
        """The metric a model of this kind is made with: ``metric``, or the kind's default if None.

        A metric the kind's codes cannot be compared with is refused in one line.
        """
        if metric is None:
            return cls.metrics[0]
        if metric not in METRICS:
            raise InvalidArgumentError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        if metric in cls.metrics:
            return metric
        if metric in BINARY_METRICS:
            raise InvalidArgumentError(
                f"--metric {metric} is for binary codes (phash, dhash); a {cls.kind} model uses "
                f"{' or '.join(cls.metrics)} (default {cls.metrics[0]})"
            )
        raise InvalidArgumentError(
            f"--metric {metric} does not apply to {cls.kind} models: their codes are bits, compared by "
            f"{' or '.join(cls.metrics)} distance; leave --metric out"
        )

    @abstractmethod
    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def encode_scored(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``encode``'s codes and each image's novelty ``(N,)`` float64, or None for a kind that has none.

        Indexing stores the novelty beside each vector, and a query's is ranked among them
        (:mod:`embedsearch.core.novelty`); only a kind that models its images (AE, VAE) has one.
        """
        return self.encode(images), None

    @classmethod
    @abstractmethod
    def fit(
        cls, images: np.ndarray, spec: InputSpec, options: EncoderOptions, workdir: Path, resume: bool = False
    ) -> Encoder:
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
    def load(cls, directory: Path, spec: InputSpec, dim: int, options: EncoderOptions) -> Encoder:
        return cls(spec, dim, options)

    def summary(self) -> dict[str, Any]:
        """Extra facts for the model's config.json (losses, epochs ...)."""
        return {}


class DecodingEncoder(Encoder):
    """An encoder with a decoder back to images: reconstructions and decoded samples (AE, VAE)."""

    @abstractmethod
    def decode(self, z: np.ndarray) -> np.ndarray:
        """(N, dim) float32 latent vectors -> (N, S, S, C) uint8 images."""

    @abstractmethod
    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, C) uint8 images -> their (N, S, S, C) uint8 reconstructions through the code."""

    @abstractmethod
    def novelty(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, C) uint8 -> (N,) float64: how badly the model explains each image, in its training loss's
        units (AE: reconstruction loss; VAE: negative ELBO). Deterministic: the same image, the same value."""

    def encode_scored(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.encode(images), self.novelty(images)


class PosteriorEncoder(DecodingEncoder):
    """A decoding encoder whose code is a Gaussian posterior q(z|x) = N(mu, exp(logvar)) (VAE).

    Its prior is N(0, I), so decoding standard normal noise samples new images.
    """

    @abstractmethod
    def encode_dist(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S, C) uint8 -> posterior mean mu and log-variance, each (N, dim) float32."""


class BinaryEncoder(Encoder):
    """An encoder whose code is bits (perceptual hashes), searched by Hamming distance only.

    ``encode`` returns ``(N, dim // 8)`` uint8, the bits packed eight to a byte, first bit highest
    (``numpy.packbits``); ``dim`` counts bits and is a multiple of 8 (FAISS's binary indexes need whole
    bytes). The database stores each code as its bytes, so a rebuild from it gives the same codes.
    """

    metrics = BINARY_METRICS
    code_dtype = np.dtype(np.uint8)

    @property
    def code_width(self) -> int:
        return self.dim // 8


def write_config(directory: Path, config: dict[str, Any]) -> None:
    path = directory / "config.json"
    with os_errors(f"cannot write the model's config {path}"):
        atomic_write(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def write_weights(path: Path, save: Callable[[str], None]) -> None:
    """Write a safetensors file atomically through ``save(file_name)``; a full disk is one line."""
    from safetensors import SafetensorError

    doing = f"cannot write the checkpoint {path}"
    try:
        with os_errors(doing):
            atomic_path(path, lambda tmp: save(str(tmp)))
    except SafetensorError as exc:  # safetensors reports I/O errors as its own type, in the OS's words
        code = errno.ENOSPC if "os error 28" in str(exc) else errno.EIO
        raise from_os_error(OSError(code, str(exc)), doing) from None
