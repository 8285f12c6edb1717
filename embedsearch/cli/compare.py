"""The ``compare`` and ``export-images`` commands: parse, call, render. The main group registers them.

They also run on their own (tests, other groups): the library home then comes from
EMBEDSEARCH_HOME, and the package's errors are turned into one line here as well.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from embedsearch.cli.context import CONTEXT, settings, status
from embedsearch.cli.context import engine as _engine
from embedsearch.cli.output import NO_PATHS, chosen, flatten, format_option, plural, write_rows
from embedsearch.errors import EmbedSearchError
from embedsearch.results import FLOAT_METRICS

if TYPE_CHECKING:
    from embedsearch.evaluation.scores import CompareConfig


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except EmbedSearchError as exc:
        raise click.ClickException(str(exc)) from None


def _command_line(home: str | None, c: CompareConfig, fmt: str, report: str | None) -> str:
    """The command with every setting spelled out, so that the report says how to repeat the run."""
    args = ["embedsearch", *(["--home", home] if home else []), "compare", c.data, "--models", ",".join(c.models)]
    args += ["--queries", c.queries] if c.queries else ["--query-fraction", str(c.query_fraction)]
    args += ["-k", str(c.k), "--seed", str(c.seed), "--train-epochs", str(c.train_epochs)]
    args += ["--metric", c.metric] if c.metric else []
    args += ["--augment", ",".join(c.augment or []) or "none"]
    args += ["--consistency", str(c.consistency), "--temperature", str(c.temperature)]
    args += ["--lr", str(c.lr), "--lr-schedule", str(c.lr_schedule)]
    args += (["--format", fmt] if fmt != "table" else []) + (["--report", report] if report else [])
    return shlex.join(args)


@click.command("compare", context_settings=CONTEXT)
@click.argument("data", type=click.Path(exists=True))
@click.option(
    "--models",
    default="ae,vae,pixels,pca",
    show_default=True,
    help="Comma-separated model names; a kind (ae, vae, pixels, pca, phash, dhash) not in the library is made here.",
)
@click.option(
    "--queries",
    type=click.Path(exists=True),
    help="Labelled query data (folder or IDX); default: --query-fraction of DATA.",
)
@click.option(
    "--query-fraction",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of DATA drawn (seeded) as queries when --queries is not given.",
)
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000), help="Neighbours scored.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Split, training and noise seed.")
@click.option(
    "--train-epochs",
    default=10,
    show_default=True,
    type=click.IntRange(1),
    help="Epochs of AE and VAE made here (both get the same settings).",
)
@click.option(
    "--metric",
    type=click.Choice(list(FLOAT_METRICS)),
    default=None,
    help="Distance of the models made here [each kind's default: cosine for ae/vae, l2 for pixels/pca; "
    "hashes: hamming]; a library's existing models keep their own.",
)
@click.option(
    "--augment",
    is_flag=False,
    flag_value="default",
    metavar="[LIST]",
    help="AE/VAE made here: augmentation, as train --augment ('none': off) [jpeg,crop,brightness,blur,noise].",
)
@click.option("--consistency", type=click.FloatRange(0), help="InfoNCE weight of the AE and VAE made here [30].")
@click.option("--temperature", type=click.FloatRange(0, min_open=True), help="InfoNCE temperature [0.1].")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="Learning rate of the AE and VAE made here [1e-3].")
@click.option(
    "--lr-schedule",
    type=click.Choice(["constant", "cosine"]),  # recipe.LR_SCHEDULES
    help="Their learning-rate schedule, as train's [constant].",
)
@format_option(NO_PATHS, json_help="Same as --format json: the results as one JSON object.")
@click.option("--report", type=click.Path(file_okay=False), help="Write report.md with PNG plots into this folder.")
@click.option("--keep-models", is_flag=True, help="Keep the models made here in the library (default: deleted after).")
@click.pass_context
def compare(
    ctx: click.Context,
    data: str,
    models: str,
    queries: str | None,
    query_fraction: float,
    k: int,
    seed: int,
    train_epochs: int,
    metric: str | None,
    augment: str | None,
    consistency: float | None,
    temperature: float | None,
    lr: float | None,
    lr_schedule: str | None,
    fmt: str | None,
    as_json: bool,
    report: str | None,
    keep_models: bool,
) -> None:
    """Compare models on labelled DATA (class subfolders, or an IDX images file beside its labels).

    Scores precision, mAP, recall, k-NN accuracy and near-duplicate recall with exact search, plus
    reconstruction error (AE/VAE), KL and active dimensions (VAE) and speed. csv and tsv have a row
    per model, a column per score (robustness.TRANSFORM.recall@10 ...).

    \b
    Example:
      embedsearch compare photos/ --models ae,vae,pixels,pca --train-epochs 5 --report out/
      embedsearch compare train-images-idx3-ubyte.gz --queries t10k-images-idx3-ubyte.gz --json
    """
    from embedsearch.evaluation.compare import run_compare
    from embedsearch.evaluation.report import format_table, write_report
    from embedsearch.evaluation.scores import CompareConfig

    fmt = chosen(fmt, as_json)
    names = [name.strip() for name in models.split(",") if name.strip()]
    with _one_line_errors():
        config = CompareConfig(
            data=data,
            models=names,
            queries=queries,
            query_fraction=query_fraction,
            k=k,
            seed=seed,
            train_epochs=train_epochs,
            metric=metric,
            augment=None if augment is None else augment.split(","),
            consistency=consistency,
            temperature=temperature,
            lr=lr,
            lr_schedule=lr_schedule,
        )
        command = _command_line(settings(ctx).get("home"), config, fmt, report)
        engine = _engine(ctx)
        engine.open(create=True)  # compare makes the models it is asked for: a new library is fine
        result, artifacts = run_compare(engine, config, command, keep_models=keep_models)
        if report:
            status(ctx, f"wrote {write_report(result, artifacts, report)}")
    summary = result.summary()
    if fmt == "json":
        click.echo(json.dumps(summary))
    elif fmt in ("csv", "tsv"):
        scores = {name: dict(flatten(m)) for name, m in summary["models"].items()}
        columns = list(dict.fromkeys(key for row in scores.values() for key in row))
        write_rows(fmt, ["model", *columns], ([name, *(row.get(c) for c in columns)] for name, row in scores.items()))
    else:
        click.echo(format_table(result))


def _prefix(idx_images: str) -> str:
    """'train-images-idx3-ubyte.gz' -> 'train-': two sets exported into one folder do not collide."""
    name = Path(idx_images).name
    return name.split("-images")[0] + "-" if "-images" in name else ""


@click.command("export-images", context_settings=CONTEXT)
@click.argument("idx_images", type=click.Path(exists=True, dir_okay=False))
@click.argument("idx_labels", type=click.Path(exists=True, dir_okay=False))
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--prefix", default=None, help="File name prefix [the IDX set's name, e.g. 'train-'].")
def export_images(idx_images: str, idx_labels: str, outdir: str, prefix: str | None) -> None:
    """Write an IDX pair (MNIST, Fashion-MNIST) as PNG files in one folder per label.

    The result is a labelled folder that 'index' and 'compare' take like any other.

    \b
    Example:
      embedsearch export-images train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz fmnist/
    """
    from embedsearch.data.idx import export_pngs, read_idx_pair

    with _one_line_errors():
        images, labels = read_idx_pair(idx_images, idx_labels)
        written = export_pngs(images, labels, outdir, prefix=_prefix(idx_images) if prefix is None else prefix)
    folders = plural(len(set(labels.tolist())), "label folder")
    click.echo(f"wrote {plural(written, 'PNG file')} in {folders} under {outdir}")
