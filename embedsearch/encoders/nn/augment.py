"""Online, seeded augmentation of training batches, and the contrastive term between two views.

Every operation works on a whole ``(B, C, S, S)`` float batch in [0, 1] with torch ops (one
``grid_sample`` for all geometric changes, one grouped convolution for blur), so that two views
of a 256-image batch cost a few milliseconds, not a Python loop per image. JPEG re-encoding cannot
be batched in torch: :func:`jpeg_pool` re-encodes every training image once, before the first
epoch, at a seeded quality, and a batch swaps in those copies for a random share of its images.

Every draw is a fraction of the side, so an operation alters a 28 px and a 64 px image alike. The
reconstruction target is always the clean image: augmentation only changes what the encoder sees.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class Strengths:
    """The ranges each operation draws from (the README's table repeats them)."""

    crop: tuple[float, float] = (0.85, 0.95)  # side of the crop, as a fraction of the image side
    shift: float = 0.08  # largest translation, as a fraction of the side
    rotate: float = 10.0  # largest rotation, in degrees
    brightness: tuple[float, float] = (0.8, 1.2)  # gain
    contrast: tuple[float, float] = (0.8, 1.2)  # scale of the deviation from the image mean
    noise: float = 0.03  # standard deviation of the Gaussian noise, in units of the full range
    blur: tuple[float, float] = (0.01, 0.04)  # Gaussian sigma, as a fraction of the side
    blur_p: float = 0.3  # share of images blurred
    jpeg_quality: tuple[int, int] = (30, 80)
    jpeg_p: float = 0.3  # share of images replaced by their JPEG copy
    flip_p: float = 0.5


STRENGTHS = Strengths()


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)  # (n,)


def _geometry(batch: int, names: Sequence[str], s: Strengths, gen: torch.Generator) -> torch.Tensor | None:
    """Per-image affine maps from output to input coordinates, (B, 2, 3), or None for identity."""
    if not {"crop", "shift", "rotate", "flip"} & set(names):
        return None
    scale = torch.ones(batch)
    tx, ty, angle, sign = torch.zeros(batch), torch.zeros(batch), torch.zeros(batch), torch.ones(batch)
    if "crop" in names:  # a square crop at a random position, resized back to the full side
        scale = _uniform(batch, *s.crop, gen)
        tx = (1 - scale) * _uniform(batch, -1.0, 1.0, gen)
        ty = (1 - scale) * _uniform(batch, -1.0, 1.0, gen)
    if "shift" in names:  # normalised coordinates span 2 per side
        tx = tx + 2 * s.shift * _uniform(batch, -1.0, 1.0, gen)
        ty = ty + 2 * s.shift * _uniform(batch, -1.0, 1.0, gen)
    if "rotate" in names:
        angle = math.radians(s.rotate) * _uniform(batch, -1.0, 1.0, gen)
    if "flip" in names:
        sign = torch.where(torch.rand(batch, generator=gen) < s.flip_p, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    row0 = torch.stack((cos * sign, -sin, tx), dim=1)  # (B, 3)
    row1 = torch.stack((sin * sign, cos, ty), dim=1)  # (B, 3)
    return torch.stack((row0, row1), dim=1)  # (B, 2, 3)


def _blur(x: torch.Tensor, s: Strengths, gen: torch.Generator) -> torch.Tensor:
    """Gaussian blur of a random share of the batch, each image with its own sigma."""
    b, c, side, _ = x.shape
    chosen = torch.rand(b, generator=gen) < s.blur_p  # (B,)
    sigma = _uniform(b, *s.blur, gen) * side  # (B,) in pixels
    radius = max(1, math.ceil(3 * s.blur[1] * side))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)  # (K,)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)  # (B, K)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).to(x.dtype)[None, :].expand(b, -1)
    kernel = torch.where(chosen[:, None], kernel, identity).repeat_interleave(c, dim=0).to(x.device)  # (B*C, K)
    flat = x.reshape(1, b * c, side, side)
    padded = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel[:, None, None, :], groups=b * c)  # separable: along x ...
    out = F.conv2d(rows, kernel[:, None, :, None], groups=b * c)  # ... then along y
    return out.reshape(b, c, side, side)


def augment_batch(
    x: torch.Tensor,
    names: Sequence[str],
    gen: torch.Generator,
    jpeg: torch.Tensor | None = None,
    strengths: Strengths = STRENGTHS,
) -> torch.Tensor:
    """One random view of each image of ``x`` (B, C, S, S) in [0, 1]; ``jpeg`` holds their JPEG copies.

    ``gen`` is a CPU generator; the draws depend only on it and the batch size, not on the pixels.
    """
    s, b = strengths, x.shape[0]
    if "jpeg" in names and jpeg is not None:
        swap = (torch.rand(b, generator=gen) < s.jpeg_p).to(x.device)[:, None, None, None]
        x = torch.where(swap, jpeg, x)
    theta = _geometry(b, names, s, gen)
    if theta is not None:
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)  # (B, S, S, 2)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if "brightness" in names:
        gain = _uniform(b, *s.brightness, gen).to(x)[:, None, None, None]
        contrast = _uniform(b, *s.contrast, gen).to(x)[:, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean) * gain
    if "blur" in names:
        x = _blur(x, s, gen)
    if "noise" in names:
        x = x + s.noise * torch.randn(x.shape, generator=gen).to(x)
    return x.clamp(0.0, 1.0)


def jpeg_pool(images: np.ndarray, seed: int, strengths: Strengths = STRENGTHS) -> np.ndarray:
    """Each (N, S, S, C) uint8 image re-encoded once as JPEG at a seeded quality: same shape."""
    rng = np.random.default_rng([seed, 7])
    qualities = rng.integers(strengths.jpeg_quality[0], strengths.jpeg_quality[1] + 1, size=len(images))
    out = np.empty_like(images)
    grey = images.shape[-1] == 1
    for i, (image, quality) in enumerate(zip(images, qualities, strict=True)):
        pic = Image.fromarray(image[..., 0] if grey else image)
        buf = io.BytesIO()
        pic.save(buf, "JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as back:
            out[i] = np.asarray(back.convert("L" if grey else "RGB")).reshape(image.shape)
    return out


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE (NT-Xent across views) of paired codes a[i] ~ b[i]: (B, L), (B, L) -> ().

    Codes are L2-normalised, so the term shapes directions: what cosine search ranks by.
    """
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    logits = a @ b.T / temperature  # (B, B); the diagonal holds the positive pairs
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
