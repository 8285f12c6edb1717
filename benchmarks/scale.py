"""Index types at scale: build time, bytes per vector, 10-recall@10 and single-query latency.

    .venv/bin/python benchmarks/scale.py [--sizes 1000000] [--types auto,flat,hnsw,ivf,ivfpq] [--memory 8G]

Vectors (issue 15): Fashion-MNIST's 60k training images encoded to 32-d by PCA (numpy SVD, the
same projection as the pca encoder), each synthetic vector a seeded random one of those codes plus
Gaussian noise of 0.3 x each dimension's spread, so the data keeps the real codes' clusters and
scales. They are inserted through the store in batches of 10,000 (image rows + vectors, one
transaction each), then each type is built with ``Engine.reindex`` (tuned to 10-recall@10 >= 0.95
on held-out stored vectors). Measured per type: reindex seconds, index file bytes per vector, RSS
growth of loading it per vector, 10-recall@10 of ``--queries`` fresh held-out vectors (never
stored) against exact search, and p50/p99 of one query on one thread (``engine.search_vectors``,
with the metadata lookup); then the metadata lookup alone (``store.images`` of 10 ids).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import OUT, fashion_mnist, machine  # noqa: E402
from embedsearch.engine import Engine  # noqa: E402

DIM = 32
BATCH = 10_000


def codes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(60000, 32) PCA codes of Fashion-MNIST train, and their per-dimension standard deviation."""
    x, _, what = fashion_mnist("train")
    flat = x.reshape(len(x), -1).astype(np.float32) / 255.0
    mean = flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat[np.random.default_rng(seed).choice(len(flat), 20_000, replace=False)] - mean, False)
    z = (flat - mean) @ vt[:DIM].T
    print(f"codes: {what} -> PCA {DIM}-d", flush=True)
    return z.astype(np.float32), z.std(axis=0).astype(np.float32)


def synthetic(base: np.ndarray, spread: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(base), n)
    return (base[picks] + rng.normal(0, 1, (n, DIM)).astype(np.float32) * 0.3 * spread).astype(np.float32)


def fill(engine: Engine, vectors: np.ndarray) -> float:
    """Insert ``vectors`` as images of model "scale" through the store, BATCH per transaction."""
    model = engine.store.add_model(name="scale", kind="pca", config={}, dim=DIM, metric="l2", image_size=28, channels=1)
    t0 = time.perf_counter()
    for start in range(0, len(vectors), BATCH):
        rows, pairs = [], []
        for i in range(start, min(start + BATCH, len(vectors))):
            sha = hashlib.sha256(i.to_bytes(8, "little")).hexdigest()
            rows.append(
                {"path": f"/scale/{i:08d}.png", "sha256": sha, "width": 28, "height": 28, "format": "PNG",
                 "mode": "L", "label": str(i % 10), "bytes": 1000, "mtime": 0.0}
            )  # fmt: skip
            pairs.append((sha, vectors[i].tobytes()))
        engine.store.write_batch({model.id: pairs}, rows)
    return time.perf_counter() - t0


_LOAD = """
import resource
import sys
from pathlib import Path
def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
from embedsearch.engine import Engine
engine = Engine(sys.argv[1])
engine.model("scale")
before = rss()
engine.vector_index("scale")
print(rss() - before, rss())
"""


def _load_rss(home: Path) -> tuple[int, int]:
    """Resident bytes a new query process gains by loading the model's index file, and its whole RSS then."""
    done = subprocess.run([sys.executable, "-c", _LOAD, str(home)], capture_output=True, text=True, check=True)
    grown, total = done.stdout.split()[-2:]
    return int(grown), int(total)


def measure(engine: Engine, kind: str, queries: np.ndarray, truth: np.ndarray, n: int, memory: str) -> dict[str, float]:
    result = engine.reindex("scale", index=kind, memory=memory, target_recall=0.95)
    size = engine.index_path("scale").stat().st_size
    grown = _load_rss(engine.home)
    index = engine.vector_index("scale")
    _, ids = index.search(queries, 10)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)]))
    times = []
    for q in queries[:300]:
        t0 = time.perf_counter()
        engine.search_vectors(q[None, :], "scale", k=10)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "type": result.type,
        "build_s": result.seconds,
        "params": result.params,
        "tuned_recall": result.recall,
        "file_bytes_per_vector": size / n,
        "rss_bytes_per_vector": grown[0] / n,
        "process_rss_gb": grown[1] / 1e9,
        "recall@10": recall,
        "p50_ms": 1000 * statistics.median(times),
        "p99_ms": 1000 * times[int(0.99 * (len(times) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000", help="comma-separated numbers of vectors")
    parser.add_argument("--types", default="auto,flat,hnsw,ivf,ivfpq", help="auto: what reindex --index auto picks")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--memory", default="8G", help="reindex's memory budget (what auto chooses by)")
    args = parser.parse_args()
    print(machine(), flush=True)
    base, spread = codes()
    for n in (int(s) for s in args.sizes.split(",")):
        home = OUT / f"scale-{n}"
        shutil.rmtree(home, ignore_errors=True)
        vectors = synthetic(base, spread, n, seed=1)
        queries = synthetic(base, spread, args.queries, seed=2)  # held out: never stored
        with Engine(home, create=True) as engine:
            seconds = fill(engine, vectors)
            print(f"n={n:,}: inserted in {seconds:.1f} s ({n / seconds:,.0f} vectors/s, batches of {BATCH:,})")
            import faiss

            exact = faiss.IndexFlatL2(DIM)
            exact.add(vectors)
            _, rows = exact.search(queries, 10)
            truth = rows + 1  # image ids are 1..n in insertion order
            for kind in args.types.split(","):
                m = measure(engine, kind, queries, truth, n, args.memory)
                shown = kind if m["type"] == kind else f"{kind}={m['type']}"
                print(
                    f"  {shown:<6} build {m['build_s']:7.1f} s | file {m['file_bytes_per_vector']:6.1f} B/vec | "
                    f"RSS {m['rss_bytes_per_vector']:6.1f} B/vec ({m['process_rss_gb']:.2f} GB process) | "
                    f"recall@10 {m['recall@10']:.3f} "
                    f"(tuned {m['tuned_recall']}) | p50 {m['p50_ms']:.2f} ms p99 {m['p99_ms']:.2f} ms | {m['params']}",
                    flush=True,
                )
            ids = list(range(1, n + 1, max(1, n // 10)))[:10]
            t0 = time.perf_counter()
            for _ in range(100):
                engine.store.images(ids)
            print(f"  metadata lookup of 10 ids among {n:,} rows: {(time.perf_counter() - t0) * 10:.2f} ms")


if __name__ == "__main__":
    main()
