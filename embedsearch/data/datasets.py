"""Labelled image data for training and evaluation: a folder (labels = first-level subfolders) or an
IDX pair (MNIST / Fashion-MNIST: ``*-images-idx3-ubyte[.gz]`` beside ``*-labels-idx1-ubyte[.gz]``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedsearch.data.idx import read_idx, read_idx_pair
from embedsearch.data.images import DEFAULT_MAX_PIXELS, InputSpec, infer_spec, scan, to_array, to_pil
from embedsearch.data.ingest import load_folder
from embedsearch.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """(N, S, S, C) uint8 images normalised to one spec, with their labels and where they came from."""

    images: np.ndarray
    labels: list[str | None]
    source: str
    paths: list[str] | None = None  # None for IDX data: the images have no files of their own
    failed: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def is_idx(data: str | os.PathLike[str]) -> bool:
    name = Path(data).name
    return Path(data).is_file() and ("idx3-ubyte" in name or "idx1-ubyte" in name)


def idx_labels_path(images: str | os.PathLike[str]) -> Path:
    """The labels file that belongs to an IDX images file (train-images-idx3 -> train-labels-idx1)."""
    path = Path(images)
    candidate = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    if candidate == path or not candidate.exists():
        raise DataError(f"{images}: no labels file beside it (expected {candidate.name})")
    return candidate


def data_spec(data: str, image_size: int | None = None, channels: int | None = None) -> InputSpec:
    """The input spec a model made from ``data`` gets when the caller leaves it open."""
    if is_idx(data):
        rows = read_idx(data).shape[1]
        return InputSpec(image_size or rows, channels or 1)
    return infer_spec([f.path for f in scan(data) if f.size >= 0], image_size, channels)


def load_dataset(data: str, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> Dataset:
    """Every usable image of ``data`` (folder or IDX) at ``spec``; unusable files are listed, not fatal."""
    if is_idx(data):
        x, y = read_idx_pair(data, idx_labels_path(data))
        return Dataset(idx_to_spec(x, spec), [str(int(v)) for v in y], str(data))
    if not Path(data).is_dir():
        raise DataError(f"{data}: neither a folder of images nor an IDX images file")
    images, labels, failed = load_folder(data, spec, max_pixels)
    paths = None  # load_folder does not return paths of the good files; callers that need them index
    return Dataset(images, labels, str(data), paths, failed)


def idx_to_spec(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, rows, cols) grey -> (N, S, S, C) with the same resize policy as image files."""
    if x.shape[1:] == (spec.image_size, spec.image_size) and spec.channels == 1:
        return np.ascontiguousarray(x[..., None])  # (N, S, S, 1): nothing to do
    return np.stack([to_array(to_pil(im), spec) for im in x])
