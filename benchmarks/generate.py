"""Generation speed: 64 candidates from a 28x28 conv VAE, decoded, each with its 5 nearest neighbours
in a 70k index, warm, in process.

    .venv/bin/python benchmarks/generate.py [--home benchmarks/out/serve-home] [--model vae]

Uses the library that benchmarks/serve.py builds (70k Fashion-MNIST PNGs indexed with a conv VAE).
Target (issue 5): <= 1 s warm.
"""

from __future__ import annotations

import argparse
import time

from common import OUT, machine, percentile_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=str(OUT / "serve-home"))
    parser.add_argument("--model", default="vae")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from embedsearch.engine import Engine

    print(machine())
    with Engine(args.home) as engine:
        vectors = len(engine.vector_index(args.model))
        for mode, kwargs in (("prior", {}), ("near", {"near": _some_image(engine, args.model)})):
            engine.generate(args.model, n=64, seed=0, search_k=5, **kwargs)  # warm-up
            times = []
            for seed in range(args.repeats):
                start = time.perf_counter()
                out = engine.generate(args.model, n=64, seed=seed, search_k=5, **kwargs)
                times.append(time.perf_counter() - start)
            assert len(out.candidates) == 64 and all(len(c.neighbours) == 5 for c in out.candidates)
            print(
                f"generate {mode}: 64 candidates + 5 nearest of {vectors:,} vectors, {args.repeats} runs: "
                f"p50 {percentile_ms(times, 50):.0f} ms, max {max(times) * 1000:.0f} ms"
            )


def _some_image(engine, model: str) -> int:
    return engine.store.entry_image_ids(engine.model(model).id)[0]


if __name__ == "__main__":
    main()
