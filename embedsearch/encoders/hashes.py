"""The hashing baselines: "phash" (perceptual, DCT) and "dhash" (difference) hashes as binary codes.

These are the codes near-duplicate finders such as imagededup use: the `imagehash` library computes
them (an optional extra, ``pip install 'embedsearch[hashes]'``, imported only when a hash is
computed), and the library searches them by Hamming distance in a FAISS binary index. They need no
training: a model of either kind is made, like pixels, from its input spec and ``hash_size`` alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from embedsearch.data.images import InputSpec, to_pil

# As EncoderOptions: inside the encoders, ``Options`` is the class attribute naming their options class.
from embedsearch.encoders.base import BinaryEncoder
from embedsearch.encoders.base import Options as EncoderOptions
from embedsearch.errors import InvalidArgumentError, ModelError

#: Side of the hash's bit grid: hash_size**2 bits. imagehash's own default, 8, gives 64 bits.
MIN_HASH_SIZE, MAX_HASH_SIZE = 2, 32
INSTALL_HINT = "pip install 'embedsearch[hashes]'"


@dataclass
class HashOptions(EncoderOptions):
    hash_size: int = 8


def imagehash_module() -> ModuleType:
    """imagehash, or one line saying how to install it."""
    try:
        import imagehash
    except ImportError:
        raise ModelError(f"the phash and dhash models need the imagehash library: {INSTALL_HINT}") from None
    return imagehash


def code_bits(hash_size: int) -> int:
    """Bits of a code: hash_size**2, padded with zero bits to whole bytes (they never differ)."""
    return -(-(hash_size**2) // 8) * 8


class _HashEncoder(BinaryEncoder):
    """One imagehash function applied to each image; its boolean grid packed into bytes."""

    needs_training = False
    Options = HashOptions
    function_name: str  # the imagehash function

    def __init__(self, spec: InputSpec, dim: int, options: EncoderOptions) -> None:
        super().__init__(spec, dim, options)
        if not isinstance(options, HashOptions):
            raise InvalidArgumentError(f"{self.kind} takes HashOptions")
        self.hash_size = options.hash_size
        self._hash: Callable[..., Any] | None = None

    def encode(self, images: np.ndarray) -> np.ndarray:
        if self._hash is None:
            self._hash = getattr(imagehash_module(), self.function_name)
        bits = np.zeros((len(images), self.dim), dtype=bool)  # (N, dim); the padding bits stay 0
        for i, image in enumerate(images):
            bits[i, : self.hash_size**2] = self._hash(to_pil(image), hash_size=self.hash_size).hash.ravel()
        return np.packbits(bits, axis=1)  # (N, dim // 8) uint8, C-contiguous

    @classmethod
    def fit(
        cls, images: np.ndarray, spec: InputSpec, options: EncoderOptions, workdir: Path, resume: bool = False
    ) -> _HashEncoder:
        if not isinstance(options, HashOptions):
            raise InvalidArgumentError(f"{cls.kind} takes HashOptions")
        if not MIN_HASH_SIZE <= options.hash_size <= MAX_HASH_SIZE:
            raise InvalidArgumentError(
                f"--hash-size must be between {MIN_HASH_SIZE} and {MAX_HASH_SIZE} (8 gives 64 bits), "
                f"not {options.hash_size}"
            )
        imagehash_module()  # a missing library is said when the model is made, not at its first image
        return cls(spec, code_bits(options.hash_size), options)

    def summary(self) -> dict[str, Any]:
        # How the vector blobs are to be read: each is this many bytes of packed bits.
        return {"code": {"dtype": "uint8", "bits": self.dim, "bytes": self.code_bytes, "packing": "numpy.packbits"}}


class PHashEncoder(_HashEncoder):
    """Perceptual hash: the signs of the low DCT frequencies of the grey image against their median."""

    kind = "phash"
    function_name = "phash"


class DHashEncoder(_HashEncoder):
    """Difference hash: whether each pixel of the grey image, shrunk to (size + 1) x size, is brighter than
    its right neighbour."""

    kind = "dhash"
    function_name = "dhash"
