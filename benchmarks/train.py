"""Training speed, encoding throughput and bulk indexing with the conv AE and VAE.

    .venv/bin/python benchmarks/train.py [--epochs 2] [--images 60000] [--skip-index]

Trains each kind (latent 32, default batch size) with the default recipe (two augmented views and the
consistency term) and, beside it, plain (one clean view), on the 60,000 Fashion-MNIST training images (read from
``../shared/datasets/fashion-mnist`` next to the repository; generated shapes if it is missing), on
all of them (no validation split, so an epoch is 60k images), and prints seconds per epoch. Then
it measures encoding throughput in batches of 256 at 28x28x1 and 64x64x3 (median of 5 runs, as the
machine may be shared), and last the end-to-end bulk indexing of the 70k Fashion-MNIST PNG files
(``benchmarks/out/fmnist-png``, shared with the other benchmarks) into a fresh library with a
conv VAE (median of 3 runs). Targets on a 2-core CPU: <= 40 s per epoch with two views, >= 20,000 images/s
encoding at 28x28, >= 4,000 images/s bulk indexing with the VAE.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import OUT, PNGS, fashion_mnist, machine, spread, write_pngs
from embedsearch.data.images import InputSpec
from embedsearch.encoders.nn.encoder import AEEncoder, NeuralEncoder, VAEEncoder
from embedsearch.encoders.nn.models import ModelConfig, build_model, use_all_cores

KINDS: list[type[NeuralEncoder]] = [AEEncoder, VAEEncoder]


#: (label, options) measured side by side: the defaults (two augmented views and the consistency
#: term) against plain training of one clean view, each at the default batch size.
RECIPES = {
    "default (2 augmented views + InfoNCE)": {},
    "plain (1 clean view)": {"augment": "none"},
}


def bench_training(images: np.ndarray, epochs: int) -> None:
    spec = InputSpec(28, 1)
    for cls in KINDS:
        for label, recipe in RECIPES.items():
            options = cls.Options(arch="conv", latent_dim=32, epochs=epochs, val_fraction=0.0, **recipe)
            with tempfile.TemporaryDirectory() as workdir:
                started = time.perf_counter()
                enc = cls.fit(images, spec, options, Path(workdir))
                total = time.perf_counter() - started
            assert enc.report is not None
            per_epoch = [h.seconds for h in enc.report.history]
            print(
                f"train {cls.kind:>3} conv latent 32 batch {options.batch_size}, {label}, {len(images)} images: "
                f"{np.mean(per_epoch):.1f} s/epoch ({', '.join(f'{s:.1f}' for s in per_epoch)}), "
                f"fit() total {total:.1f} s, final train loss {enc.report.history[-1].train_loss:.2f}",
                flush=True,
            )


def bench_encoding(count: int, repeats: int = 5) -> None:
    rng = np.random.default_rng(1)
    for size, channels in ((28, 1), (64, 3)):
        spec = InputSpec(size, channels)
        images = rng.integers(0, 256, (count, size, size, channels), dtype=np.uint8)
        for cls in KINDS:
            options = cls.Options(latent_dim=32)
            model = build_model(ModelConfig("conv", size, channels, 32, cls.variational), seed=0)
            enc = cls(spec, 32, options, model)  # throughput does not depend on the weights
            enc.encode(images[:512])  # warm-up
            rates = []
            for _ in range(repeats):
                started = time.perf_counter()
                enc.encode(images)
                rates.append(count / (time.perf_counter() - started))
            print(
                f"encode {cls.kind:>3} conv {size}x{size}x{channels}, batch 256, {count} images: {spread(rates)}",
                flush=True,
            )


def bench_bulk_index(images: np.ndarray, runs: int = 3) -> None:
    """A conv VAE (1 epoch on 2,000 images: the weights do not change the speed), then index the PNGs."""
    from embedsearch.engine import Engine

    count = write_pngs()
    rates = []
    for run in range(runs):
        home = OUT / "train-bench-home"
        shutil.rmtree(home, ignore_errors=True)
        with Engine(home) as engine:
            engine.fit_model("vae", "vae", images[:2000], InputSpec(28, 1), options={"epochs": 1, "arch": "conv"})
            started = time.perf_counter()
            report = engine.index(str(PNGS), "vae")
            wall = time.perf_counter() - started
        rates.append(count / wall)
        print(
            f"bulk index {count:,} PNG files (28x28 grey) with a conv VAE, run {run + 1}: {report.added:,} added "
            f"({report.duplicates} duplicates) in {wall:.1f} s -> {count / wall:,.0f} images/s end to end",
            flush=True,
        )
    print(f"bulk index with a conv VAE: {spread(rates)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per kind (each is timed)")
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--encode-images", type=int, default=20_480)
    parser.add_argument("--skip-index", action="store_true", help="leave out the bulk-index run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  %(name)s: %(message)s", stream=sys.stdout)
    use_all_cores()
    print(f"{machine()} | torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    x, _, source = fashion_mnist("train")
    images = x[: args.images, ..., None]  # (N, 28, 28, 1)
    print(f"training data: {len(images)} images of {images.shape[1:]} from {source}", flush=True)
    bench_training(images, args.epochs)
    bench_encoding(args.encode_images)
    if not args.skip_index:
        bench_bulk_index(images)


if __name__ == "__main__":
    main()
