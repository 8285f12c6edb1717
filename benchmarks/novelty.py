"""What storing each image's novelty (out-of-distribution warnings) costs a bulk index run.

    .venv/bin/python benchmarks/novelty.py [--per-class 400] [--runs 5] [--workers 0]

Writes 8 x ``--per-class`` 28x28 grey shapes, makes a conv AE and a conv VAE (one quick epoch on a
few of them: the cost does not depend on how well they are trained), then indexes the folder into
each model ``--runs`` times with novelty (codes and the decoder's loss in one pass, what indexing
does) and as many times without (codes only, ``encode``), alternately, each run on an emptied
index. Prints the medians and ranges of the whole runs and of the encoding alone.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from common import OUT, machine


def _spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    from embedsearch.data.synth import make_shapes
    from embedsearch.encoders.nn.encoder import NeuralEncoder
    from embedsearch.engine import Engine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0: in the indexing process)")
    args = parser.parse_args()
    print(machine())
    root = OUT / "novelty"
    shutil.rmtree(root, ignore_errors=True)
    data, few = root / "data", root / "few"
    make_shapes(data, per_class=args.per_class, size=28, mode="L")
    make_shapes(few, per_class=10, size=28, mode="L")
    scored = NeuralEncoder.encode_scored

    def plain(self: NeuralEncoder, images: np.ndarray) -> tuple[np.ndarray, None]:
        return self.encode(images), None

    modes: dict[str, Callable[..., Any]] = {"with novelty": scored, "codes only": plain}
    with Engine(root / "home") as engine:
        engine.index(str(data), "pixels", workers=args.workers)  # the image rows: every later run encodes only
        for kind in ("ae", "vae"):
            engine.create_model(kind, kind, str(few), options={"epochs": 1, "latent_dim": 16})
            model, encoder = engine.model(kind), engine.encoder(kind)
            batch = np.zeros((len(engine.store.entry_image_ids(engine.model("pixels").id)), 28, 28, 1), np.uint8)
            runs: dict[str, list[float]] = {name: [] for name in modes}
            encodes: dict[str, list[float]] = {name: [] for name in modes}
            for _ in range(args.runs):
                for name, method in modes.items():
                    NeuralEncoder.encode_scored = method  # type: ignore[method-assign]
                    t0 = time.perf_counter()
                    encoder.encode_scored(batch)
                    encodes[name].append(time.perf_counter() - t0)
                    ids = engine.store.entry_image_ids(model.id)
                    if ids:
                        with engine.cache.writing():
                            engine.store.delete_entries(model.id, ids)
                            engine.cache.rebuild(model)
                    t0 = time.perf_counter()
                    engine.index(str(data), kind, workers=args.workers)
                    runs[name].append(time.perf_counter() - t0)
            NeuralEncoder.encode_scored = scored  # type: ignore[method-assign]
            ratio = statistics.median(runs["with novelty"]) / statistics.median(runs["codes only"])
            for name in modes:
                print(
                    f"{kind} {name:12s}: index {len(batch)} images {_spread(runs[name])}; "
                    f"encode {_spread(encodes[name])}"
                )
            print(f"{kind}: index run with novelty {ratio:.2f}x the time without (medians of {args.runs})")


if __name__ == "__main__":
    main()
