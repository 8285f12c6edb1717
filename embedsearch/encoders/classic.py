"""The classic kinds: "pixels" (the resized image itself) and "pca" (its principal components).

Plain numpy (safetensors for PCA's weights): importing this module never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedsearch.data.images import InputSpec

# As EncoderOptions: inside PCAEncoder, ``Options`` is the class attribute naming its options class.
from embedsearch.encoders.base import WEIGHTS_FILE, Encoder, write_weights
from embedsearch.encoders.base import Options as EncoderOptions
from embedsearch.errors import InvalidArgumentError, ModelError


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """(N, S, S, C) uint8 -> (N, S*S*C) float32 in [0, 1], C-contiguous."""
    flat = images.reshape(len(images), -1)
    return np.multiply(flat, np.float32(1.0 / 255.0), dtype=np.float32)


class PixelsEncoder(Encoder):
    """The resized image itself, flattened: the baseline that needs no training."""

    kind = "pixels"
    needs_training = False

    def encode(self, images: np.ndarray) -> np.ndarray:
        return to_unit_float(images)  # (N, S*S*C)

    @classmethod
    def fit(
        cls, images: np.ndarray, spec: InputSpec, options: EncoderOptions, workdir: Path, resume: bool = False
    ) -> PixelsEncoder:
        return cls(spec, spec.image_size**2 * spec.channels, options)


@dataclass
class PCAOptions(EncoderOptions):
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
        options: EncoderOptions,
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
        cls, images: np.ndarray, spec: InputSpec, options: EncoderOptions, workdir: Path, resume: bool = False
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
        tensors = {"mean": np.ascontiguousarray(self.mean), "components": np.ascontiguousarray(self.components)}
        write_weights(path, lambda name: save_file(tensors, name))
        return path

    @classmethod
    def load(cls, directory: Path, spec: InputSpec, dim: int, options: EncoderOptions) -> PCAEncoder:
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
