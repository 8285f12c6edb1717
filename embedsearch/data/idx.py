"""The IDX format of MNIST and Fashion-MNIST (images and labels, gzip-compressed or plain)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from embedsearch.errors import DataError

#: magic number -> number of dimensions (uint8 data: the third byte of the magic is 0x08)
_MAGIC = {2049: 1, 2051: 3}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """An IDX file as a uint8 array: (N,) labels or (N, rows, cols) images."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 8:
        raise DataError(f"{path}: too short to be an IDX file")
    (magic,) = struct.unpack(">I", data[:4])
    if magic not in _MAGIC:
        raise DataError(f"{path}: not an IDX file of uint8 images or labels (magic {magic}, expected 2049 or 2051)")
    ndim = _MAGIC[magic]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataError(
            f"{path}: truncated or padded IDX file ({len(data) - header} bytes of data, header says {expected})"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_pair(images: str | os.PathLike[str], labels: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N, rows, cols) images and their (N,) labels, checked to belong together."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1:
        raise DataError(f"{images} must hold images and {labels} labels")
    if len(x) != len(y):
        raise DataError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    return x, y


def export_pngs(
    images: np.ndarray,
    labels: np.ndarray,
    out: str | os.PathLike[str],
    names: list[str] | None = None,
    prefix: str = "",
) -> int:
    """Write (N, rows, cols) grey images as OUT/<label>/<prefix><i>.png; returns the number written."""
    from embedsearch.data.images import to_pil  # Pillow only when writing

    out = Path(out)
    width = len(str(len(images)))
    for label in np.unique(labels):
        (out / (names[label] if names else str(label))).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=False)):
        folder = names[label] if names else str(label)
        to_pil(image).save(out / folder / f"{prefix}{i:0{width}d}.png", compress_level=1)
    return len(images)
