"""The networks: a plain autoencoder and a variational one built from the same blocks.

Both take ``(N, C, S, S)`` float images in [0, 1]. The decoder outputs logits; ``decode`` applies
the sigmoid, while losses are computed from the logits (BCE-with-logits is stable where
``log(sigmoid(.))`` is not). The VAE differs from the AE only where the theory says: a second
linear head for the log-variance, the reparameterised sample z = mu + sigma * eps during training,
and the KL term of the loss. Its embedding is the mean mu, so encoding stays deterministic.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedsearch.errors import InvalidArgumentError

ARCHS = ("conv", "mlp")
LIKELIHOODS = ("bernoulli", "gaussian")
# The conv design was chosen by measurement on Fashion-MNIST (AE, latent 32, 10 epochs, L2;
# precision@10 of the 10k test images against the 60k training images; 2 CPU cores). Plain 4x4
# convs reached 0.836; 3x3 kernels cost 9/16 of their compute, and batch norm plus a dense hidden
# layer of 256 lift it to 0.840 (seeds 0 and 1) at about the same speed. A dense layer of 512
# reached 0.842 but trains 30% slower; a cosine learning-rate decay, lr 2e-3, shift augmentation
# and the gaussian likelihood did not help.
#: Output channels of the first two stride-2 stages; any later stage keeps the last width.
CONV_CHANNELS = (32, 64)
CONV_KERNEL = 3  # stride 2, padding 1: halves an even size; the decoder adds output_padding 1
#: Extra stride-2 stages are added while the feature map is even and larger than this, so that
#: 64x64 or 128x128 inputs do not end in a huge dense layer (28 -> 7, 32 -> 8, 64 -> 8, 128 -> 8).
CONV_MIN_MAP = 8
#: Width of the dense hidden layer between the conv features and the code (both directions).
CONV_DENSE = 256
MLP_HIDDEN = (512, 256)
NEG_SLOPE = 0.2


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network before loading its weights."""

    arch: str
    image_size: int
    channels: int
    latent_dim: int
    variational: bool

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise InvalidArgumentError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.channels not in (1, 3):
            raise InvalidArgumentError(f"channels must be 1 or 3, not {self.channels}")
        if not 1 <= self.latent_dim <= 4096:
            raise InvalidArgumentError(f"latent_dim must be between 1 and 4096, not {self.latent_dim}")
        if self.image_size < 1:
            raise InvalidArgumentError(f"image size must be positive, not {self.image_size}")
        if self.arch == "conv" and self.image_size % 4:
            raise InvalidArgumentError(
                f"the conv architecture needs an image size that is a multiple of 4 (28, 32, 64, 128 ...), "
                f"not {self.image_size}; choose such a size or the mlp architecture"
            )

    @property
    def pixels(self) -> int:
        return self.channels * self.image_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return cls(
            str(values["arch"]),
            int(values["image_size"]),
            int(values["channels"]),
            int(values["latent_dim"]),
            bool(values["variational"]),
        )


def conv_widths(image_size: int) -> list[int]:
    """Output channels of each stride-2 conv stage for a square input of ``image_size``."""
    widths = list(CONV_CHANNELS)
    side = image_size // 4
    while side > CONV_MIN_MAP and side % 2 == 0:
        widths.append(widths[-1])
        side //= 2
    return widths


def _act() -> nn.Module:
    return nn.LeakyReLU(NEG_SLOPE)


def _down(in_ch: int, out_ch: int) -> list[nn.Module]:
    """Conv stage: (N, in, s, s) -> (N, out, s/2, s/2)."""
    return [nn.Conv2d(in_ch, out_ch, CONV_KERNEL, stride=2, padding=1), nn.BatchNorm2d(out_ch), _act()]


def _up(in_ch: int, out_ch: int, last: bool) -> list[nn.Module]:
    """Transposed-conv stage: (N, in, s, s) -> (N, out, 2s, 2s); the last one outputs plain logits."""
    conv = nn.ConvTranspose2d(in_ch, out_ch, CONV_KERNEL, stride=2, padding=1, output_padding=1)
    return [conv] if last else [conv, nn.BatchNorm2d(out_ch), _act()]


class ConvEncoderBody(nn.Module):
    """Strided conv stages, flatten, dense: (N, C, S, S) -> (N, CONV_DENSE)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths = conv_widths(config.image_size)
        side = config.image_size >> len(widths)  # S / 2**stages
        layers: list[nn.Module] = []
        for in_ch, out_ch in zip([config.channels, *widths[:-1]], widths, strict=False):
            layers += _down(in_ch, out_ch)
        layers += [nn.Flatten(), nn.Linear(widths[-1] * side * side, CONV_DENSE), _act()]
        self.net = nn.Sequential(*layers)
        self.features = CONV_DENSE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, C, S, S) -> (N, CONV_DENSE)


class ConvDecoder(nn.Module):
    """The mirror image: dense, unflatten, transposed conv stages: (N, L) -> logits (N, C, S, S)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths = conv_widths(config.image_size)
        side = config.image_size >> len(widths)
        layers: list[nn.Module] = [
            nn.Linear(config.latent_dim, CONV_DENSE),
            _act(),
            nn.Linear(CONV_DENSE, widths[-1] * side * side),
            _act(),
            nn.Unflatten(1, (widths[-1], side, side)),
        ]
        outs = [*widths[-2::-1], config.channels]  # e.g. widths [32, 64] -> stages 64->32, 32->C
        for i, (in_ch, out_ch) in enumerate(zip(widths[::-1], outs, strict=False)):
            layers += _up(in_ch, out_ch, last=i == len(outs) - 1)
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (N, L) -> (N, C, S, S)


class MLPEncoderBody(nn.Module):
    """Flatten, then two hidden layers: (N, C, S, S) -> (N, MLP_HIDDEN[-1])."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h1, h2 = MLP_HIDDEN
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(config.pixels, h1), _act(), nn.Linear(h1, h2), _act())
        self.features = h2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, C, S, S) -> (N, h2)


class MLPDecoder(nn.Module):
    """The mirror image: (N, L) -> logits (N, C, S, S)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h1, h2 = MLP_HIDDEN
        shape = (config.channels, config.image_size, config.image_size)
        self.net = nn.Sequential(
            nn.Linear(config.latent_dim, h2),
            _act(),
            nn.Linear(h2, h1),
            _act(),
            nn.Linear(h1, config.pixels),
            nn.Unflatten(1, shape),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (N, L) -> (N, C, S, S)


@dataclass
class LossTerms:
    """Batch means of the per-image terms; ``total`` = recon + beta * kl is what is minimised."""

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


def reconstruction_loss(logits: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Negative log-likelihood of ``x`` under the decoder, summed per image: (N, C, S, S) -> (N,).

    bernoulli: binary cross-entropy (x in [0, 1] is treated as a probability).
    gaussian: squared error of sigmoid(logits), i.e. a fixed-variance Gaussian with constants dropped.
    """
    dims = tuple(range(1, x.ndim))
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=dims)
    if likelihood == "gaussian":
        return (torch.sigmoid(logits) - x).square().sum(dim=dims)
    raise InvalidArgumentError(f"unknown likelihood {likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row: (N, L), (N, L) -> (N,).

    Closed form 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2); exactly 0 at mu = 0, logvar = 0.
    """
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) drawn from ``generator``: (N, L) -> (N, L)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)  # (N, L)
    return mu + torch.exp(0.5 * logvar) * eps


class Autoencoder(nn.Module):
    """Deterministic autoencoder: z = head(body(x)), x' = sigmoid(decoder(z))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.body: ConvEncoderBody | MLPEncoderBody
        self.decoder: ConvDecoder | MLPDecoder
        if config.arch == "conv":
            self.body, self.decoder = ConvEncoderBody(config), ConvDecoder(config)
        else:
            self.body, self.decoder = MLPEncoderBody(config), MLPDecoder(config)
        self.head = nn.Linear(self.body.features, config.latent_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # (N, C, S, S) -> (N, L)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # (N, L) -> (N, C, S, S)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))  # (N, L) -> (N, C, S, S) in [0, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_logits(self.encode(x))  # (N, C, S, S) -> logits (N, C, S, S)

    def terms(
        self, x: torch.Tensor, target: torch.Tensor, likelihood: str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image (recon, kl) of reconstructing ``target`` from ``x``, and the search code of ``x``.

        (N, C, S, S) twice -> (N,), (N,), (N, L). ``x`` may be an augmented view of ``target``.
        """
        z = self.encode(x)  # (N, L)
        recon = reconstruction_loss(self.decode_logits(z), target, likelihood)
        return recon, torch.zeros_like(recon), z

    def novelty(self, x: torch.Tensor, likelihood: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The search code of each image and its reconstruction loss: (N, C, S, S) -> (N, L), (N,)."""
        z = self.encode(x)  # (N, L)
        return z, reconstruction_loss(self.decode_logits(z), x, likelihood)

    def loss(
        self, x: torch.Tensor, likelihood: str, beta: float = 1.0, generator: torch.Generator | None = None
    ) -> LossTerms:
        """Loss of reconstructing a batch from itself; ``beta`` and ``generator`` only matter to the VAE."""
        recon, kl, _ = self.terms(x, x, likelihood, generator)
        return LossTerms(recon.mean() + beta * kl.mean(), recon.mean(), kl.mean())


class VariationalAutoencoder(Autoencoder):
    """VAE: the same body with two heads, mean ``head`` and log-variance ``logvar_head``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.logvar_head = nn.Linear(self.body.features, config.latent_dim)

    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)  # (N, F)
        return self.head(h), self.logvar_head(h)  # mu (N, L), logvar (N, L)

    def terms(
        self, x: torch.Tensor, target: torch.Tensor, likelihood: str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Negative ELBO terms with z sampled (a generator is required); the search code is mu."""
        if generator is None:
            raise InvalidArgumentError("the VAE loss samples z and needs a torch.Generator")
        mu, logvar = self.encode_dist(x)  # (N, L) each
        z = reparameterize(mu, logvar, generator)  # (N, L)
        recon = reconstruction_loss(self.decode_logits(z), target, likelihood)  # (N,)
        return recon, kl_divergence(mu, logvar), mu

    def novelty(self, x: torch.Tensor, likelihood: str) -> tuple[torch.Tensor, torch.Tensor]:
        """mu and the negative ELBO (beta 1) with z = mu instead of a sample: (N, C, S, S) -> (N, L), (N,).

        Decoding the mean makes the value deterministic (a sampled z would give the same image a
        different score per query); it is the ELBO's usual one-sample estimate at its most likely sample.
        """
        mu, logvar = self.encode_dist(x)  # (N, L) each
        recon = reconstruction_loss(self.decode_logits(mu), x, likelihood)  # (N,)
        return mu, recon + kl_divergence(mu, logvar)


def build_model(config: ModelConfig, seed: int) -> Autoencoder:
    """A freshly initialised network; the initial weights depend on ``seed`` only.

    The global torch RNG is forked so that building a model never disturbs the caller's stream.
    """
    cls = VariationalAutoencoder if config.variational else Autoencoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    if config.arch == "conv":
        # NHWC is both how images arrive and what oneDNN convolutions run fastest on (measured).
        # Module.to takes memory_format at run time; torch's overloads for it leave the keyword out.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, C-contiguous; read-only arrays are fine (never written)."""
    with warnings.catch_warnings():
        # Arrays from np.frombuffer or memory maps are read-only; we only ever read them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1], same shape: the one conversion training and encoding share."""
    return images.to(torch.float32).mul_(1.0 / 255.0)


def images_to_tensor(images: torch.Tensor) -> torch.Tensor:
    """(N, S, S, C) uint8 -> (N, C, S, S) float32 in [0, 1], channels_last in memory (a view)."""
    return unit_float(images).permute(0, 3, 1, 2)  # (N, C, S, S)


def tensor_to_images(x: torch.Tensor) -> torch.Tensor:
    """(N, C, S, S) float in [0, 1] -> (N, S, S, C) uint8, rounded."""
    return x.permute(0, 2, 3, 1).mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def pick_device() -> torch.device:
    """CUDA, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def use_all_cores() -> None:
    """Let torch use every core this process may run on, unless OMP_NUM_THREADS says otherwise.

    The affinity mask is used where the OS has one: in a container limited to 2 of 64 cores,
    ``os.cpu_count()`` says 64 and 64 threads would thrash. An explicit OMP_NUM_THREADS wins, so
    that on a shared machine a user can keep training or serving from taking every core.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(wanted) if wanted.isdigit() and int(wanted) > 0 else cores
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
