"""Training speed and encoding throughput of the conv AE and VAE.

    .venv/bin/python benchmarks/train.py [--epochs 1] [--images 60000]

Trains each kind (latent 32, batch 128) on the 60,000 Fashion-MNIST training images (read from
``../shared/datasets/fashion-mnist`` next to the repository; random images if it is missing), on
all of them (no validation split, so an epoch is 60k images), and prints seconds per epoch. Then
it measures encoding throughput in batches of 256 at 28x28x1 and 64x64x3 (best of 3 runs, as the
machine may be shared). Targets on a 2-core CPU: <= 20 s per epoch, >= 20,000 images/s at 28x28.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from embedsearch.images import InputSpec
from embedsearch.nn.encoder import AEEncoder, NeuralEncoder, VAEEncoder
from embedsearch.nn.models import ModelConfig, build_model

FASHION = REPO.parent / "shared" / "datasets" / "fashion-mnist" / "train-images-idx3-ubyte.gz"
KINDS: list[type[NeuralEncoder]] = [AEEncoder, VAEEncoder]


def read_idx_images(path: Path) -> np.ndarray:
    """An IDX3 image file (gzip) -> (N, rows, cols, 1) uint8."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic, n, rows, cols = np.frombuffer(data, dtype=">i4", count=4)
    if magic != 2051 or len(data) != 16 + n * rows * cols:
        raise SystemExit(f"{path}: not an IDX3 image file (magic {magic}, {len(data)} bytes)")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols, 1)


def training_images(count: int) -> tuple[np.ndarray, str]:
    if FASHION.is_file():
        return read_idx_images(FASHION)[:count], f"Fashion-MNIST ({FASHION})"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, 28, 28, 1), dtype=np.uint8), "random images (Fashion-MNIST not found)"


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"date {datetime.datetime.now().isoformat(timespec='seconds')}, {platform.platform()}, "
            f"{platform.processor() or platform.machine()}, cpu_count {os.cpu_count()} (usable {cores}), "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, numpy {np.__version__}, "
            f"python {platform.python_version()}")


def bench_training(images: np.ndarray, epochs: int) -> None:
    spec = InputSpec(28, 1)
    for cls in KINDS:
        options = cls.Options(arch="conv", latent_dim=32, epochs=epochs, batch_size=128, val_fraction=0.0)
        with tempfile.TemporaryDirectory() as workdir:
            started = time.perf_counter()
            enc = cls.fit(images, spec, options, Path(workdir))
            total = time.perf_counter() - started
        assert enc.report is not None
        per_epoch = [h.seconds for h in enc.report.history]
        print(f"train {cls.kind:>3} conv latent 32 batch 128, {len(images)} images: "
              f"{np.mean(per_epoch):.1f} s/epoch ({', '.join(f'{s:.1f}' for s in per_epoch)}), "
              f"fit() total {total:.1f} s, final train loss {enc.report.history[-1].train_loss:.2f}", flush=True)


def bench_encoding(count: int, repeats: int = 3) -> None:
    rng = np.random.default_rng(1)
    for size, channels in ((28, 1), (64, 3)):
        spec = InputSpec(size, channels)
        images = rng.integers(0, 256, (count, size, size, channels), dtype=np.uint8)
        for cls in KINDS:
            options = cls.Options(latent_dim=32)
            model = build_model(ModelConfig("conv", size, channels, 32, cls.variational), seed=0)
            enc = cls(spec, 32, options, model)  # throughput does not depend on the weights
            enc.encode(images[:512])  # warm-up
            best = 0.0
            for _ in range(repeats):
                started = time.perf_counter()
                enc.encode(images)
                best = max(best, count / (time.perf_counter() - started))
            print(f"encode {cls.kind:>3} conv {size}x{size}x{channels}, batch 256, {count} images: "
                  f"{best:,.0f} images/s (best of {repeats})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--encode-images", type=int, default=20_480)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(name)s: %(message)s", stream=sys.stdout)
    from embedsearch.nn.models import use_all_cores

    use_all_cores()
    print(machine(), flush=True)
    images, source = training_images(args.images)
    print(f"training data: {len(images)} images of {images.shape[1:]} from {source}", flush=True)
    bench_training(images, args.epochs)
    bench_encoding(args.encode_images)


if __name__ == "__main__":
    main()
