"""AE vs VAE vs raw pixels vs PCA on Fashion-MNIST: the full ``embedsearch compare`` run.

    .venv/bin/python benchmarks/compare.py [--epochs 10] [--home DIR]

Database: the 60,000 training images; queries: the 10,000 t10k images (both from
``../shared/datasets/fashion-mnist`` next to the repository). AE and VAE are trained here with the
same settings (conv, latent 32, batch 128, lr 1e-3, seed 0, ``--epochs`` each) in a fresh library,
benchmarks/out/compare-home/ (emptied first; ``--reuse`` keeps its models, so nothing is trained).
Prints the table and the total wall time and
writes the report to benchmarks/out/compare-report/. Targets on a 2-core CPU: the best learned 32-d
embedding reaches precision@10 >= 0.84 (raw pixels ~0.81), and the whole run takes <= 10 minutes.
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

from common import FASHION, OUT, machine  # noqa: E402
from embedsearch.engine import Engine  # noqa: E402
from embedsearch.evaluation.compare import CompareConfig, run_compare  # noqa: E402
from embedsearch.evaluation.report import format_table, write_report  # noqa: E402

TARGET_PRECISION = 0.84
TARGET_SECONDS = 600.0
LEARNED = ("ae", "vae", "pca")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="AE and VAE epochs (the same for both)")
    parser.add_argument(
        "--home", default=str(OUT / "compare-home"), help="library folder (the default is emptied first)"
    )
    parser.add_argument("--reuse", action="store_true", help="keep the library's models instead of retraining")
    parser.add_argument("--report", default=str(OUT / "compare-report"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(name)s: %(message)s", stream=sys.stderr)
    train, test = FASHION / "train-images-idx3-ubyte.gz", FASHION / "t10k-images-idx3-ubyte.gz"
    if not train.is_file() or not test.is_file():
        raise SystemExit(f"{FASHION}: Fashion-MNIST not found (see ../shared/datasets/README.md)")
    print(machine(), flush=True)
    home = Path(args.home)
    if not args.reuse:
        if home != OUT / "compare-home" and home.exists() and any(home.iterdir()):
            raise SystemExit(f"{home} is not empty; pass --reuse to use its models, or name a new folder")
        shutil.rmtree(home, ignore_errors=True)  # a fresh library: AE and VAE are trained in this run
    config = CompareConfig(
        data=str(train),
        queries=str(test),
        models=["ae", "vae", "pixels", "pca"],
        k=10,
        seed=0,
        train_epochs=args.epochs,
        latent_dim=32,
    )
    command = shlex.join(
        [
            "embedsearch",
            "--home",
            str(home),
            "compare",
            str(train),
            "--queries",
            str(test),
            "--models",
            ",".join(config.models),
            "-k",
            "10",
            "--seed",
            "0",
            "--train-epochs",
            str(args.epochs),
            "--metric",
            "l2",
            "--report",
            args.report,
        ]
    )
    started = time.perf_counter()
    with Engine(home, create=True) as engine:
        result, artifacts = run_compare(engine, config, command)
        write_report(result, artifacts, args.report)
    wall = time.perf_counter() - started
    print(format_table(result))
    for name, m in result.models.items():
        trained = f", trained in {m.train_seconds:.1f} s" if m.train_seconds is not None else ""
        print(
            f"{name}: neardup_recall@1 {m.neardup_recall[1]:.4f}, neardup_recall@10 {m.neardup_recall[10]:.4f}{trained}"
        )
    learned = {n: m.precision for n, m in result.models.items() if m.kind in LEARNED and m.dim == 32}
    best = max(learned, key=learned.__getitem__)
    print(
        f"best learned 32-d precision@10: {best} {learned[best]:.4f} (target >= {TARGET_PRECISION}: "
        f"{'met' if learned[best] >= TARGET_PRECISION else 'MISSED'}); pixels "
        f"{result.models['pixels'].precision:.4f}"
    )
    print(
        f"total wall time {wall:.1f} s (target <= {TARGET_SECONDS:.0f} s: "
        f"{'met' if wall <= TARGET_SECONDS else 'MISSED'}); report in {args.report}"
    )


if __name__ == "__main__":
    main()
