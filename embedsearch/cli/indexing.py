"""The ``index`` command: parse, call :meth:`Engine.index_models`, render. The main group registers it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from embedsearch.cli.context import CONTEXT, fit_option, printable, settings
from embedsearch.cli.context import emit as _emit
from embedsearch.cli.context import engine as _engine
from embedsearch.cli.output import plural
from embedsearch.results import METRICS

if TYPE_CHECKING:
    from embedsearch.core.ray_bulk import RayOptions
    from embedsearch.engine import Engine


F = TypeVar("F", bound=Callable[..., Any])


def ray_option(text: str) -> Callable[[F], F]:
    """``--ray`` alone (Ray started here) or ``--ray ADDRESS`` (a cluster), as ``ray_address``."""
    return click.option(
        "--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]", help=text
    )


@click.command("index", context_settings=CONTEXT)
@click.argument("data", type=click.Path(exists=True))
@click.option(
    "--model",
    "model",
    default=None,
    help="Model name, or several separated by commas ('pixels' is created on first use).",
)
@click.option("--all-models", is_flag=True, help="Index into every model of the library.")
@click.option(
    "--metric",
    type=click.Choice(list(METRICS)),
    default=None,
    help="Distance of a model created here (default l2; phash and dhash: hamming).",
)
@fit_option("Resize policy of a model created here (pixels): pad or crop [pad].")
@click.option(
    "--batch-size", default=2048, show_default=True, type=click.IntRange(1), help="Images per committed batch."
)
@click.option(
    "--workers", default=None, type=click.IntRange(0), help="Decoding processes, or Ray workers (default: all cores)."
)
@ray_option(
    "Read, decode and encode on Ray: the cluster at ADDRESS ('auto', 'ray://head:10001'), "
    "or Ray started here without one. Files must be at the same path on every node."
)
@click.option("--prune", is_flag=True, help="Forget the indexed files under DATA that are gone from disk.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (one object per model).")
@click.pass_context
def index(
    ctx: click.Context,
    data: str,
    model: str | None,
    all_models: bool,
    metric: str | None,
    fit: str | None,
    batch_size: int,
    workers: int | None,
    ray_address: str | None,
    prune: bool,
    as_json: bool,
) -> None:
    """Bulk-index every image under DATA (a folder, recursively, or one file).

    Incremental: a second run adds nothing; changed files are re-encoded; identical files are
    stored once. Files that cannot be used are listed with the reason and never stop the run.
    With several models (``--model a,b`` or ``--all-models``) each file is read and decoded once
    for all of them. With --ray (pip install 'embedsearch[ray]') files are read, decoded and
    encoded on a Ray cluster, at the same path on every node (a shared filesystem); this process
    scans and commits as without. Indexed files under DATA that are gone from disk are listed
    (and kept: an unmounted disk must not empty the library); --prune forgets them.

    \b
    Example:
      embedsearch index photos/ --model pixels
      embedsearch index photos/ --model pixels,vae
      embedsearch index photos/ --all-models --prune
      embedsearch index /shared/photos --model vae --ray=auto
    """
    engine = _engine(ctx)
    names = _index_models(engine, model, all_models)
    reports = engine.index_models(
        data,
        names,
        metric=metric,
        fit=fit,
        batch_size=batch_size,
        workers=workers,
        progress=not settings(ctx).get("quiet") and sys.stderr.isatty(),
        ray=_ray_options(ray_address),
        prune=prune,
    )
    if as_json:
        for report in reports:
            _emit(report.to_dict())
        return
    for path, reason in reports[0].failed:
        click.echo(f"failed: {printable(path)}: {printable(reason)}")
    for report in reports:
        click.echo(
            f"{plural(report.scanned, 'file')}, model {printable(repr(report.model))}: added {report.added}, "
            f"updated {report.updated}, unchanged {report.unchanged}, duplicates {report.duplicates}, "
            f"failed {len(report.failed)} in {report.seconds:.1f} s ({report.images_per_second:,.0f} images/s)"
        )
    _print_missing(reports[0].missing, reports[0].pruned, prune)
    if reports[0].skipped_endings:
        from embedsearch.data.images import skipped_text

        click.echo(skipped_text(reports[0].skipped_endings))


def _print_missing(missing: list[str], pruned: int, prune: bool) -> None:
    """The gone files, the first 20 by name (all of them in --json), and what became of them."""
    if not missing:
        return
    for path in missing[:20]:
        click.echo(f"gone: {printable(path)}")
    if len(missing) > 20:
        click.echo(f"gone: ... and {len(missing) - 20} more (--json lists all)")
    files = plural(len(missing), "indexed file")
    if prune:
        click.echo(f"{files} no longer on disk: forgot {plural(pruned, 'image')}")
    else:
        click.echo(f"{files} no longer on disk, kept; 'index --prune' forgets them")


def _ray_options(address: str | None) -> RayOptions | None:
    """``--ray`` alone starts Ray here; ``--ray ADDRESS`` joins a cluster; no --ray: no Ray at all."""
    if address is None:
        return None
    from embedsearch.core.ray_bulk import RayOptions  # never imports ray itself: the run does, if it can

    return RayOptions(address=None if address == "local" else address)


def _index_models(engine: Engine, model: str | None, all_models: bool) -> list[str]:
    """The models ``index`` writes to: ``--model a,b,c`` or ``--all-models`` (exactly one of them)."""
    if (model is None) == (not all_models):
        raise click.UsageError("name the models with --model NAME[,NAME...] or pass --all-models (one of the two)")
    if all_models:
        names = [m.name for m in engine.models()]
        if not names:
            raise click.UsageError("the library has no models yet; name one with --model (e.g. --model pixels)")
        return names
    names = [n.strip() for n in (model or "").split(",") if n.strip()]
    if not names:
        raise click.UsageError("--model needs at least one model name")
    return names


@click.command("reindex", context_settings=CONTEXT)
@click.option("--model", required=True, help="Model whose index to rebuild from its stored vectors.")
@click.option(
    "--index",
    "index_type",
    default="auto",
    show_default=True,
    help="Index type: flat (exact), hnsw, ivf, ivfpq, or auto (by size and --memory).",
)
@click.option("--memory", default=None, help="Memory budget of auto's choice, e.g. 4G or 512M [half the RAM].")
@click.option(
    "--target-recall",
    default=0.95,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="10-recall@10 the search parameter is tuned to, on held-out stored vectors.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the training and query samples.")
@click.option(
    "--shards",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="ivf/ivfpq: add the vectors in this many parallel jobs (threads, or Ray tasks), then merge the lists.",
)
@ray_option("Run the --shards jobs as Ray tasks: on the cluster at ADDRESS ('auto'), or on Ray started here.")
@click.option("--json", "as_json", is_flag=True, help="Print the choice as JSON.")
@click.pass_context
def reindex(
    ctx: click.Context,
    model: str,
    index_type: str,
    memory: str | None,
    target_recall: float,
    seed: int,
    shards: int,
    ray_address: str | None,
    as_json: bool,
) -> None:
    """Rebuild a model's index from its stored vectors, as an exact or approximate FAISS index.

    auto keeps the exact flat index below 100k vectors, takes HNSW while it fits --memory and
    IVF-PQ with exact re-ranking beyond. The choice, its parameters and the measured recall are
    recorded and shown by info and models.

    \b
    Example:
      embedsearch reindex --model vae --index auto --memory 4G
      embedsearch reindex --model vae --index hnsw --target-recall 0.98 --json
      embedsearch reindex --model vae --index ivfpq --shards 8
      embedsearch reindex --model vae --index ivfpq --shards 64 --ray=auto
    """
    from dataclasses import asdict

    ray = _ray_options(ray_address)
    result = _engine(ctx).reindex(model, index_type, memory, target_recall, seed, shards=shards, ray=ray)
    if as_json:
        _emit(asdict(result))
        return
    recall = "exact" if result.type == "flat" else "not measured" if result.recall is None else f"{result.recall:.3f}"
    params = ", ".join(f"{k}={v}" for k, v in result.params.items()) or "-"
    click.echo(
        f"model {printable(repr(result.model))}: {result.type} index ({params}) of {result.vectors} vectors, "
        f"10-recall@10 {recall} (chosen by {result.chosen_by}) in {result.seconds:.1f} s"
        + (f", added in {result.shards} shards" if result.shards > 1 else "")
    )
