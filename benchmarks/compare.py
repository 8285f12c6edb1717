"""AE vs VAE vs raw pixels vs PCA vs phash on Fashion-MNIST: the full ``embedsearch compare`` run.

    .venv/bin/python benchmarks/compare.py [--epochs 10] [--models ae,vae,pixels,pca,phash] [--home DIR]

Database: the 60,000 training images; queries: the 10,000 t10k images (both from
``../shared/datasets/fashion-mnist`` next to the repository). AE and VAE are trained here with the
same settings (the training defaults: conv, latent 32, batch 256, augmentation and the consistency
term, seed 0, ``--epochs`` each) in a fresh library, benchmarks/out/compare-home/ (emptied first;
``--reuse`` keeps its models, so nothing is trained). Prints the table, the robustness table and the
total wall time and writes the report to benchmarks/out/compare-report/. Targets on a 2-core CPU:
the best learned model reaches precision@10 >= 0.86 with neardup_recall@10 >= 0.92 and @1 >= 0.70,
both AE and VAE neardup_recall@10 >= 0.85, and the whole run takes <= 15 minutes.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import DATASETS, FASHION, OUT, machine  # noqa: E402
from embedsearch.engine import Engine  # noqa: E402
from embedsearch.evaluation.compare import run_compare  # noqa: E402
from embedsearch.evaluation.report import format_table, write_report  # noqa: E402
from embedsearch.evaluation.scores import CompareConfig, CompareResult  # noqa: E402

TARGET_PRECISION = 0.86
TARGET_SECONDS = 900.0


def check_fashion(result: CompareResult, best: str) -> None:
    """Issue 13's Fashion-MNIST targets, each with its figure."""
    m = result.models[best]
    met = m.precision >= TARGET_PRECISION and m.neardup_recall[10] >= 0.92 and m.neardup_recall[1] >= 0.70
    pixels = f"; pixels {result.models['pixels'].precision:.4f}" if "pixels" in result.models else ""
    print(
        f"best learned precision@10: {best} {m.precision:.4f}, its neardup_recall@10 {m.neardup_recall[10]:.4f}"
        f" and @1 {m.neardup_recall[1]:.4f} (targets >= {TARGET_PRECISION}, >= 0.92, >= 0.70: "
        f"{'met' if met else 'MISSED'}){pixels}"
    )
    for name, r in result.models.items():
        if r.kind in ("ae", "vae"):
            ok = "met" if r.neardup_recall[10] >= 0.85 else "MISSED"
            print(f"{name}: neardup_recall@10 {r.neardup_recall[10]:.4f} (target >= 0.85: {ok})")


def check_twemoji(result: CompareResult, best: str) -> None:
    """The twemoji target: the best learned model beats every baseline on P@10 and each robustness column."""
    m = result.models[best]
    for name, other in result.models.items():
        if other.kind in ("ae", "vae"):
            continue
        lost = [t for t, r in other.robustness.items() if m.robustness[t]["recall@10"] < r["recall@10"]]
        if m.precision <= other.precision:
            lost.insert(0, "precision@10")
        verdict = "beaten everywhere" if not lost else f"NOT beaten on {', '.join(lost)}"
        print(f"{best} against {name}: {verdict} (ties at 1.000 count as not beaten only if below)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="AE and VAE epochs (the same for both)")
    parser.add_argument("--dataset", choices=["fashion-mnist", "twemoji-64"], default="fashion-mnist")
    parser.add_argument("--home", help="library folder [benchmarks/out/compare-home(-twemoji); emptied first]")
    parser.add_argument("--models", default="ae,vae,pixels,pca,phash", help="comma-separated models to compare")
    parser.add_argument("--reuse", action="store_true", help="keep the library's models instead of retraining")
    parser.add_argument("--report", help="report folder [benchmarks/out/compare-report(-twemoji)]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(name)s: %(message)s", stream=sys.stderr)
    twemoji = args.dataset == "twemoji-64"
    suffix = "-twemoji" if twemoji else ""
    args.report = args.report or str(OUT / f"compare-report{suffix}")
    default_home = OUT / f"compare-home{suffix}"
    if twemoji:  # colour 64 px category folders; a seeded fifth of them are the queries
        train, test = DATASETS / "twemoji-64", None
    else:
        train, test = FASHION / "train-images-idx3-ubyte.gz", FASHION / "t10k-images-idx3-ubyte.gz"
    if not train.exists() or (test is not None and not test.is_file()):
        raise SystemExit(f"{train}: data set not found (see ../shared/datasets/README.md)")
    print(machine(), flush=True)
    home = Path(args.home) if args.home else default_home
    if not args.reuse:
        if home != default_home and home.exists() and any(home.iterdir()):
            raise SystemExit(f"{home} is not empty; pass --reuse to use its models, or name a new folder")
        shutil.rmtree(home, ignore_errors=True)  # a fresh library: AE and VAE are trained in this run
    config = CompareConfig(
        data=str(train),
        queries=str(test) if test else None,
        query_fraction=0.2 if twemoji else 0.1,
        models=args.models.split(","),
        k=10,
        seed=0,
        train_epochs=args.epochs,
        latent_dim=32,
    )
    command = shlex.join(
        ["embedsearch", "--home", str(home), "compare", str(train)]
        + (["--queries", str(test)] if test else ["--query-fraction", str(config.query_fraction)])
        + ["--models", ",".join(config.models), "-k", "10", "--seed", "0", "--train-epochs", str(args.epochs)]
        + ["--report", args.report]
    )
    started = time.perf_counter()
    with Engine(home, create=True) as engine:
        result, artifacts = run_compare(engine, config, command, keep_models=True)
        write_report(result, artifacts, args.report)
    wall = time.perf_counter() - started
    print(format_table(result))
    for name, m in result.models.items():
        trained = f", trained in {m.train_seconds:.1f} s" if m.train_seconds is not None else ""
        print(
            f"{name}: neardup_recall@1 {m.neardup_recall[1]:.4f}, neardup_recall@10 {m.neardup_recall[10]:.4f}{trained}"
        )
    learned = {n: m for n, m in result.models.items() if m.kind in ("ae", "vae")}
    if learned:
        best = max(learned, key=lambda n: learned[n].precision)
        (check_twemoji if twemoji else check_fashion)(result, best)
    print(
        f"total wall time {wall:.1f} s (target <= {TARGET_SECONDS:.0f} s: "
        f"{'met' if wall <= TARGET_SECONDS else 'MISSED'}); report in {args.report}"
    )


if __name__ == "__main__":
    main()
