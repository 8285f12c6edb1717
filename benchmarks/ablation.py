"""The ablation behind the AE/VAE training defaults: augmentation, consistency weight, temperature, metric, latent size.

    .venv/bin/python benchmarks/ablation.py [--db 10000] [--queries 2000] [--epochs 4] [--only NAME,...]

A seeded subset of Fashion-MNIST (``--db`` training images as the database, the first ``--queries``
t10k images as queries) is compared with ``embedsearch compare``'s own code for each setting below,
training the AE and the VAE afresh with identical settings each time (pixels and PCA once, for
reference). Prints one row per (setting, model): precision@10, near-duplicate recall@1/@10 (the
mixed alteration) and training seconds, and writes every result to benchmarks/out/ablation/.
The full-size run of the chosen defaults is ``benchmarks/compare.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import FASHION, OUT, machine  # noqa: E402
from embedsearch.engine import Engine  # noqa: E402
from embedsearch.evaluation.compare import run_compare  # noqa: E402
from embedsearch.evaluation.scores import CompareConfig  # noqa: E402

#: name -> CompareConfig settings. "default" is whatever the code's defaults are.
ALL_OPS = ["crop", "shift", "rotate", "brightness", "blur", "noise", "jpeg"]
SETTINGS: dict[str, dict[str, Any]] = {
    "plain-l2": {"augment": [], "consistency": 0.0, "metric": "l2"},
    "plain-cos": {"augment": [], "consistency": 0.0, "metric": "cosine"},
    "aug-cos": {"augment": ["default"], "consistency": 0.0, "metric": "cosine"},
    "aug+c10-cos": {"augment": ["default"], "consistency": 10.0, "metric": "cosine"},
    "aug+c30-cos": {"augment": ["default"], "consistency": 30.0, "metric": "cosine"},
    "aug+c100-cos": {"augment": ["default"], "consistency": 100.0, "metric": "cosine"},
    "aug+c30-t0.1-cos": {"augment": ["default"], "consistency": 30.0, "temperature": 0.1, "metric": "cosine"},
    "aug+c30-t0.5-cos": {"augment": ["default"], "consistency": 30.0, "temperature": 0.5, "metric": "cosine"},
    "aug+c30-l2": {"augment": ["default"], "consistency": 30.0, "metric": "l2"},
    "aug+c30-lat64-cos": {"augment": ["default"], "consistency": 30.0, "metric": "cosine", "latent_dim": 64},
    "allops+c30-cos": {"augment": ALL_OPS, "consistency": 30.0, "metric": "cosine"},
    # A second round, after temperature 0.1 came out ahead of 0.2 and 0.5:
    "aug+c30-t0.05-cos": {"augment": ["default"], "consistency": 30.0, "temperature": 0.05, "metric": "cosine"},
    "aug+c100-t0.1-cos": {"augment": ["default"], "consistency": 100.0, "temperature": 0.1, "metric": "cosine"},
    "aug+jpeg+c30-t0.1-cos": {
        "augment": ["default", "jpeg"],
        "consistency": 30.0,
        "temperature": 0.1,
        "metric": "cosine",
    },
    "aug+blur+jpeg+c30-t0.1-cos": {
        "augment": ["default", "blur", "jpeg"],
        "consistency": 30.0,
        "temperature": 0.1,
        "metric": "cosine",
    },
}


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file of uint8 images (N, R, C) or labels (N,)."""
    magic = 2051 if array.ndim == 3 else 2049
    path.write_bytes(struct.pack(f">I{array.ndim}I", magic, *array.shape) + np.ascontiguousarray(array).tobytes())


def subset(db: int, queries: int, seed: int) -> tuple[Path, Path]:
    """The subset's IDX files (database, queries), written once under benchmarks/out/ablation-data/."""
    from embedsearch.data.idx import read_idx_pair

    folder = OUT / "ablation-data" / f"db{db}-q{queries}-s{seed}"
    train, test = folder / "train-images-idx3-ubyte", folder / "t10k-images-idx3-ubyte"
    if train.exists() and test.exists():
        return train, test
    folder.mkdir(parents=True, exist_ok=True)
    x, y = read_idx_pair(FASHION / "train-images-idx3-ubyte.gz", FASHION / "train-labels-idx1-ubyte.gz")
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=db, replace=False))
    write_idx(train, x[rows])
    write_idx(folder / "train-labels-idx1-ubyte", y[rows])
    qx, qy = read_idx_pair(FASHION / "t10k-images-idx3-ubyte.gz", FASHION / "t10k-labels-idx1-ubyte.gz")
    write_idx(test, qx[:queries])
    write_idx(folder / "t10k-labels-idx1-ubyte", qy[:queries])
    return train, test


def run(name: str, settings: dict[str, Any], models: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    train, test = subset(args.db, args.queries, args.seed)
    home = OUT / "ablation" / "home"
    shutil.rmtree(home, ignore_errors=True)
    config = CompareConfig(
        data=str(train), queries=str(test), models=models, train_epochs=args.epochs, seed=args.seed, **settings
    )
    started = time.perf_counter()
    with Engine(home, create=True) as engine:
        result, _ = run_compare(engine, config, command=f"benchmarks/ablation.py {name}", keep_models=True)
    rows = []
    for model, res in result.models.items():
        rows.append(
            {
                "setting": name,
                "model": model,
                "metric": res.metric,
                "precision@10": res.precision,
                "neardup_recall@1": res.neardup_recall[1],
                "neardup_recall@10": res.neardup_recall[10],
                "train_seconds": res.train_seconds,
                "robustness_recall@10": {t: r["recall@10"] for t, r in res.robustness.items()},
                "config": {k: v for k, v in config.to_dict().items() if k in settings or k == "latent_dim"},
            }
        )
    log.info("%s: %.0f s", name, time.perf_counter() - started)
    return rows


log = logging.getLogger("ablation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=int, default=10_000, help="database images (a seeded subset of train)")
    parser.add_argument("--queries", type=int, default=2_000, help="query images (the first of t10k)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma-separated setting names (default: all)")
    parser.add_argument("--no-baselines", action="store_true", help="skip pixels and PCA")
    parser.add_argument("--results", default="results.json", help="file name under benchmarks/out/ablation/")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(name)s: %(message)s", stream=sys.stderr)
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"{FASHION}: Fashion-MNIST not found (see ../shared/datasets/README.md)")
    names = args.only.split(",") if args.only else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    print(machine(), f"| db {args.db}, queries {args.queries}, {args.epochs} epochs", flush=True)
    out = OUT / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if not args.no_baselines:
        rows += run("baselines", {"metric": "l2"}, ["pixels", "pca"], args)
    for name in names:
        rows += run(name, SETTINGS[name], ["ae", "vae"], args)
        (out / args.results).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'setting':<20} {'model':<7} {'metric':<7} {'P@10':>7} {'ND@1':>7} {'ND@10':>7} {'train s':>8}")
    for r in rows:
        secs = f"{r['train_seconds']:.0f}" if r["train_seconds"] else "-"
        print(
            f"{r['setting']:<20} {r['model']:<7} {r['metric']:<7} {r['precision@10']:>7.4f} "
            f"{r['neardup_recall@1']:>7.4f} {r['neardup_recall@10']:>7.4f} {secs:>8}"
        )


if __name__ == "__main__":
    main()
