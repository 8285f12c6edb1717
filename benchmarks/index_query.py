"""Bulk indexing of 28x28 PNG files (pixels encoder) and warm query latency over 70k vectors.

    .venv/bin/python benchmarks/index_query.py [--runs 3] [--queries 2000]

Writes Fashion-MNIST (train + test = 70k; generated images when ../shared/datasets is absent) as PNG
files under benchmarks/out/, indexes them into a new library with the pixels encoder (``--runs``
times, median reported), trains a 32-d PCA model, indexes again, and times single in-process
queries (encode + search + metadata).
Targets (issue 2): indexing >= 5,000 images/s; warm 32-d query p50 <= 3 ms.
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np

from common import OUT, PNGS, machine, percentile_ms, spread, write_pngs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3, help="bulk runs into a new library (median reported)")
    args = parser.parse_args()
    from embedsearch.engine import Engine

    print(machine())
    n = write_pngs()
    data = str(PNGS)
    home = OUT / "bench-home"
    rates = []
    for run in range(1, args.runs + 1):  # each into a new library; the machine is shared, so several runs
        shutil.rmtree(home, ignore_errors=True)
        with Engine(home) as engine:
            start = time.perf_counter()
            report = engine.index(data, "pixels")
            wall = time.perf_counter() - start
        rates.append(n / wall)
        print(
            f"index {n} PNG files into a new library, pixels encoder (784-d), run {run}: {report.added} added, "
            f"{len(report.failed)} failed, {wall:.1f} s -> {n / wall:,.0f} images/s end to end",
            flush=True,
        )
    print(f"bulk index, pixels: {spread(rates)}")
    with Engine(home) as engine:
        again = time.perf_counter()
        second = engine.index(data, "pixels")
        print(f"second run: {second.added} added, {second.unchanged} unchanged in {time.perf_counter() - again:.1f} s")

        start = time.perf_counter()
        engine.create_model("pca32", "pca", data, options={"dim": 32})
        print(f"train pca32 on {n} images: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        engine.index(data, "pca32")
        print(f"index with pca32: {time.perf_counter() - start:.1f} s")

        files = sorted(str(p) for p in PNGS.rglob("*.png"))
        rng = np.random.default_rng(0)
        picks = [files[i] for i in rng.choice(len(files), args.queries, replace=False)]
        for path in picks[:50]:  # warm-up: model, index, caches
            list(engine.query([path], "pca32", k=10))
        for model in ("pca32", "pixels"):
            times, self_first = [], 0
            for path in picks:
                t0 = time.perf_counter()
                [result] = list(engine.query([path], model, k=10))
                times.append(time.perf_counter() - t0)
                self_first += result.results[0].path == path
            print(
                f"warm query {model} over {len(engine.vector_index(model)):,} vectors, k=10, "
                f"{len(picks)} queries: p50 {percentile_ms(times, 50):.2f} ms, p99 {percentile_ms(times, 99):.2f} ms "
                f"(query image first in {self_first}/{len(picks)})"
            )


if __name__ == "__main__":
    main()
