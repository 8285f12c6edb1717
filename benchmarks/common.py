"""Shared helpers of the benchmark scripts: where the data is, how to print the machine."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT.parent / "shared" / "datasets"
FASHION = DATASETS / "fashion-mnist"
OUT = ROOT / "benchmarks" / "out"
PNGS = OUT / "fmnist-png"


def machine() -> str:
    return (
        f"{platform.node()} | {platform.machine()} | {os.cpu_count()} cores | Python {platform.python_version()} | "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    )


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray, str]:
    """(N, 28, 28) uint8 images, labels and a description; generated shapes when the data is absent."""
    from embedsearch.data.idx import read_idx_pair

    prefix = "t10k" if split == "test" else "train"
    images, labels = FASHION / f"{prefix}-images-idx3-ubyte.gz", FASHION / f"{prefix}-labels-idx1-ubyte.gz"
    if images.exists() and labels.exists():
        x, y = read_idx_pair(images, labels)
        return x, y, f"Fashion-MNIST {split} ({len(x)} images)"
    from embedsearch.data.synth import make_image_array

    n = 10_000 if split == "test" else 60_000
    x, y = make_image_array(n, 28, 1, seed=0 if split == "train" else 1)
    return x[..., 0], y, f"generated shapes ({n} images; {FASHION} not found)"


def spread(rates: list[float], unit: str = "images/s") -> str:
    """'median X unit over N runs (min A, max B)': the figure a shared, noisy machine allows."""
    import statistics

    return (
        f"median {statistics.median(rates):,.0f} {unit} over {len(rates)} runs "
        f"(min {min(rates):,.0f}, max {max(rates):,.0f})"
    )


def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000.0, q))


def write_pngs() -> int:
    """Fashion-MNIST train + test (70k) as PNG files in label folders under PNGS, written once and
    reused by every benchmark (generated shapes when the data set is absent); returns the count."""
    import shutil

    from embedsearch.data.idx import export_pngs

    marker = PNGS / ".complete"
    if marker.exists():
        return int(marker.read_text())
    shutil.rmtree(PNGS, ignore_errors=True)
    count = 0
    for split in ("train", "test"):
        x, y, what = fashion_mnist(split)
        count += export_pngs(x, y, PNGS, prefix=f"{split}-")
        print(f"wrote {what} as PNG")
    marker.write_text(str(count))
    return count
