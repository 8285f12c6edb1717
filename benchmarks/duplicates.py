"""Near-duplicate groups: precision and recall of planted copies, and memory over 1M vectors.

    .venv/bin/python benchmarks/duplicates.py [--db 20000] [--planted 1000] [--models pixels,pca,phash,ae,vae]
    .venv/bin/python benchmarks/duplicates.py --memory-test [--vectors 1000000]

Planted copies: ``--db`` Fashion-MNIST training images (a seeded choice) plus an altered copy of
``--planted`` of them: the mixed alteration of ``compare``'s near-duplicate test
(:func:`embedsearch.evaluation.metrics.augment`: crop, brightness, noise, JPEG), and, separately,
a plain JPEG re-encoding (quality 60). The models are made from the database images only (kept in
``--home``: the AE is trained once). Each model encodes the library and
:func:`embedsearch.core.duplicates.find_groups` groups it, exactly as ``embedsearch duplicates``
does with the library's index, at the default (calibrated) threshold. Pairs implied by the groups:
every two images of one group. Recall: planted pairs (original, copy) whose images share a group,
over all planted pairs; precision: planted pairs found over all implied pairs (so a real
near-duplicate pair of the data set counts against it). The sweep lines give the same at other
fractions of the calibration distance.

``--memory-test``: 1M 32-d vectors (a seeded Gaussian mixture, 1% of them close copies of another)
in a flat FAISS index, grouped by the same function; prints peak RSS (getrusage) and time.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import OUT, fashion_mnist, machine  # noqa: E402
from embedsearch.core import duplicates as dup  # noqa: E402
from embedsearch.core import knn  # noqa: E402

SWEEP = (0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def status_mb(field: str) -> float | None:
    """VmRSS / VmHWM from /proc/self/status (Linux), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Start VmHWM afresh (Linux >= 4.0), so that it shows the grouping's own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def implied_pairs(groups: list[tuple[np.ndarray, np.ndarray]]) -> int:
    return sum(len(ids) * (len(ids) - 1) // 2 for ids, _ in groups)


def planted_found(groups: list[tuple[np.ndarray, np.ndarray]], planted: np.ndarray, n: int) -> int:
    """Planted (original, copy) rows that share a group."""
    label = np.full(n, -1, dtype=np.int64)
    for g, (ids, _) in enumerate(groups):
        label[ids] = g
    a, b = label[planted[:, 0]], label[planted[:, 1]]
    return int(((a >= 0) & (a == b)).sum())


def scores(groups: list[tuple[np.ndarray, np.ndarray]], planted: np.ndarray, n: int) -> tuple[float, float, int]:
    found, implied = planted_found(groups, planted, n), implied_pairs(groups)
    return (found / implied if implied else 1.0), found / len(planted), implied


def library(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28, 1) uint8 database images (a seeded choice) and the rows of those to copy."""
    x, _, what = fashion_mnist("train")
    rng = np.random.default_rng(args.seed)
    db = x[np.sort(rng.choice(len(x), args.db, replace=False))][..., None]
    print(f"{what}: {args.db} database images, {args.planted} of them copied")
    return db, np.sort(rng.choice(args.db, args.planted, replace=False))


def planted_library(db: np.ndarray, originals: np.ndarray, alteration: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The database followed by the altered copies, and the (original, copy) row pairs."""
    from embedsearch.evaluation.metrics import augment

    copies = augment(db[originals], seed) if alteration == "mixed" else jpeg(db[originals])
    planted = np.stack([originals, len(db) + np.arange(len(originals))], axis=1)
    return np.concatenate([db, copies]), planted


def jpeg(images: np.ndarray, quality: int = 60) -> np.ndarray:
    """Each (S, S, 1) image re-encoded as JPEG: the lightest copy a library meets (a re-saved file)."""
    import io

    from PIL import Image

    out = np.empty_like(images)
    for i, image in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buf, "JPEG", quality=quality)
        out[i, ..., 0] = np.asarray(Image.open(buf).convert("L"))
    return out


def models(args: argparse.Namespace, db: np.ndarray) -> tuple[Any, list[tuple[str, str]]]:
    """An Engine on ``--home`` with each kind made from the database (kept there: ``ae`` is reused on
    the next run), and the (model, metric) pairs to evaluate."""
    from embedsearch.data.images import InputSpec
    from embedsearch.engine import Engine

    options = {"pca": {"dim": 32, "seed": 0}, "ae": {"epochs": args.epochs, "latent_dim": 32, "seed": 0}}
    options["vae"] = options["ae"]
    if args.retrain:
        shutil.rmtree(args.home, ignore_errors=True)
    engine = Engine(args.home, create=True)
    wanted = []
    for item in args.models.split(","):
        kind, _, metric = item.partition(":")
        name = f"{kind}-{args.db}" + (f"-e{args.epochs}" if kind in ("ae", "vae") else "")
        if engine.store.model(name) is None:
            started = time.perf_counter()
            engine.fit_model(name, kind, db, InputSpec(28, 1), options=options.get(kind, {}))
            print(f"  made {name} in {time.perf_counter() - started:.1f} s", flush=True)
        wanted.append((name, metric or engine.model(name).metric))
    return engine, wanted


def evaluate(name: str, vectors: np.ndarray, metric: str, planted: np.ndarray) -> None:
    index = knn.flat_index(knn.dim_of(vectors, metric), metric)
    index.add(knn.prepare(vectors, metric))
    n = len(vectors)
    grouping = dup.find_groups(index, metric)
    precision, recall, implied = scores(grouping.groups, planted, n)
    print(
        f"{name:<12} threshold {grouping.threshold:.4g} ({grouping.method}): {len(grouping.groups)} groups, "
        f"{implied} pairs, precision {precision:.3f}, recall {recall:.3f} in {grouping.seconds:.1f} s"
    )
    # The sweep: one range search at the loosest threshold, then each fraction's pairs by distance.
    unit = dup.euclidean(metric, grouping.threshold) / dup.FRACTION  # the calibration distance
    a, b, d = dup.range_pairs(index, metric, dup.from_euclidean(metric, unit * max(SWEEP)))
    ratios = [dup.euclidean(metric, _distance(vectors, metric, i, j)) / unit for i, j in planted]
    quartiles = ", ".join(f"{q:.2f}" for q in np.quantile(ratios, [0.25, 0.5, 0.75]))
    print(f"{'':<12} planted-pair distance / calibration distance (Euclidean scale): quartiles {quartiles}")
    for fraction in SWEEP:
        t = dup.from_euclidean(metric, unit * fraction)
        keep = d <= t
        nodes, roots = dup.components(a[keep], b[keep])
        groups = [(nodes[roots == r], np.zeros(0)) for r in np.unique(roots)]  # quadratic, but few groups
        p, r, implied = scores(groups, planted, n)
        print(
            f"{'':<12}   fraction {fraction:.2f}: threshold {t:.4g}, {implied} pairs, precision {p:.3f}, recall {r:.3f}"
        )


def _distance(vectors: np.ndarray, metric: str, i: int, j: int) -> float:
    x = knn.prepare(vectors[[i, j]], metric)
    if knn.is_binary(metric):
        return float(np.unpackbits(x[0] ^ x[1]).sum())
    return float(np.linalg.norm(x[0] - x[1])) if metric == "l2" else float(1.0 - x[0] @ x[1])


def memory_test(n: int, seed: int) -> None:
    """n 32-d vectors, 1% of them close copies; grouped through the same core function."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, 32)).astype(np.float32) * 4
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, 32)).astype(np.float32)
    copies = n // 100
    originals = rng.choice(n - copies, copies, replace=False)
    x[n - copies :] = x[originals] + 0.05 * rng.standard_normal((copies, 32)).astype(np.float32)
    planted = np.stack([originals, np.arange(n - copies, n)], axis=1)
    index = knn.flat_index(32, "l2")
    index.add(x)
    del x
    before, now, fresh = peak_mb(), status_mb("VmRSS"), reset_peak()
    started = time.perf_counter()
    grouping = dup.find_groups(index, "l2")
    seconds = time.perf_counter() - started
    during = status_mb("VmHWM") if fresh else None
    precision, recall, implied = scores(grouping.groups, planted, n)
    print(
        f"{n:,} x 32-d ({copies:,} planted copies): threshold {grouping.threshold:.4g} ({grouping.method}), "
        f"{len(grouping.groups):,} groups, {implied:,} pairs, precision {precision:.3f}, recall {recall:.3f}"
    )
    # clear_refs resets getrusage's peak too: ``before`` is the peak of making the vectors and the index.
    print(f"time {seconds:.1f} s; peak RSS before grouping {before:,.0f} MB (making the vectors)")
    if during is not None and now is not None:
        print(f"while grouping: RSS {now:,.0f} MB at the start (the index), peak {during:,.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=int, default=20_000, help="database images (Fashion-MNIST train)")
    parser.add_argument("--planted", type=int, default=1000, help="planted copies")
    parser.add_argument(
        "--models", default="pixels,pca,phash,ae,vae", help="kind[:metric],... (default metric: the kind's)"
    )
    parser.add_argument("--epochs", type=int, default=10, help="AE/VAE epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alterations", default="mixed,jpeg", help="planted copies: mixed chain, JPEG only, or both")
    parser.add_argument("--home", default=str(OUT / "duplicates-home"), help="library of the models (kept)")
    parser.add_argument("--retrain", action="store_true", help="empty --home first: make every model anew")
    parser.add_argument("--memory-test", action="store_true", help="1M 32-d vectors in a flat index instead")
    parser.add_argument("--vectors", type=int, default=1_000_000, help="with --memory-test")
    args = parser.parse_args()
    print(machine(), flush=True)
    if args.memory_test:
        memory_test(args.vectors, args.seed)
        return
    db, originals = library(args)
    engine, wanted = models(args, db)
    with engine:
        for alteration in args.alterations.split(","):
            images, planted = planted_library(db, originals, alteration, args.seed)
            print(f"\n{alteration} copies: {len(db)} + {len(originals)} images", flush=True)
            encoded = {name: engine.encoder(name).encode(images) for name in dict(wanted)}
            for name, metric in wanted:
                evaluate(f"{name} {metric}", encoded[name], metric, planted)


if __name__ == "__main__":
    main()
