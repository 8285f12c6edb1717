"""``query``, ``info`` and ``models``: parse, call one Engine method, render in the chosen --format.

The main group registers them.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from embedsearch.cli.context import CONTEXT, printable, status
from embedsearch.cli.context import emit as _emit
from embedsearch.cli.context import engine as _engine
from embedsearch.cli.output import (
    NO_PATHS,
    Rows,
    chosen,
    flatten,
    format_option,
    ood_warning_line,
    plural,
    print_result,
    write_paths,
    write_rows,
)
from embedsearch.errors import EmbedSearchError

QUERY_COLUMNS = ["query", "model", "rank", "id", "path", "label", "distance"]
MODEL_COLUMNS = ["name", "kind", "image_size", "channels", "fit", "dim", "metric", "vectors", "index"]


@click.command("query", context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--model", required=True, help="Model whose index to search.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 10_000), help="Neighbours per query.")
@format_option(json_help="Same as --format json: one JSON line per query.")
@click.option("--grid", type=click.Path(dir_okay=False), help="Write a PNG: each query, then its neighbours.")
@click.option(
    "--explain",
    is_flag=True,
    help="With --grid (AE, VAE): under each query's row, what the model kept: the query's and each hit's "
    "reconstruction, and for a VAE the decoded midpoint between the query and each hit.",
)
@click.option("--include-generated", is_flag=True, help="Also return generated images (generate --add).")
@click.option("--label", help="Only results with this label.")
@click.option("--under", type=click.Path(), help="Only results at or under this path (a folder or a file).")
@click.pass_context
def query(
    ctx: click.Context,
    images: tuple[str, ...],
    model: str,
    k: int,
    fmt: str | None,
    as_json: bool,
    grid: str | None,
    explain: bool,
    include_generated: bool,
    label: str | None,
    under: str | None,
) -> None:
    """Find the indexed images nearest to each IMAGE (files, folders of images, or id:N for the
    library's image N; a file named like that: ./id:N).

    Every result that can be given is printed; the files that cannot be read and the ids that name
    no image are listed on stderr, and then the exit status is 1. csv and tsv have a row per
    neighbour (query, model, rank, id, path, label, distance); paths the neighbours' files, one per
    line.

    Through an AE or VAE model each query also gets its novelty percentile among the indexed images
    ("ood_percentile" in json); above 99, a warning line on stderr: the results may be meaningless.

    \b
    Example:
      embedsearch query photos/cat.png --model pixels -k 5 --grid cats.png
      embedsearch query queries/ --model vae --json > results.jsonl
      embedsearch query photos/cat.png --model vae --format paths | xargs feh
      embedsearch query id:123 id:456 --model vae -k 5
      embedsearch query photos/cat.png --model vae --label cat --under photos/2024/
      embedsearch query photos/cat.png id:123 --model vae -k 5 --explain --grid why.png
    """
    from embedsearch.results import QueryResult

    if explain and not grid:
        raise click.UsageError("--explain draws the reconstructions into the picture: add --grid OUT.png")
    fmt = chosen(fmt, as_json)
    rows = Rows(fmt, QUERY_COLUMNS)
    results, good, failed = [], 0, 0
    explained = []  # with --explain: an Explanation per result
    found = _engine(ctx).query(list(images), model, k, include_generated=include_generated, label=label, under=under)
    for item in found:
        if not isinstance(item, QueryResult):
            click.echo(f"skipped {printable(item[0])}: {printable(item[1])}", err=True)
            failed += 1
            continue
        good += 1
        if explain:  # before the first output: a model without a decoder is an error, not half a run
            explained.append(_engine(ctx).explain(model, item.query, [n.id for n in item.results]))
        _write_query(fmt, item, rows)
        if grid:
            results.append(item)
    if grid and results:
        from embedsearch.render.pictures import explained_grid, query_grid

        if explain:
            out = explained_grid(results, explained, Path(grid))
        else:
            out = query_grid(results, Path(grid), query_files=[_query_file(ctx, r.query) for r in results])
        status(ctx, f"wrote {printable(out)}")
    if failed:  # after every good result: a script sees them all, and the status says some are missing
        total = plural(good + failed, "query image")
        raise click.ClickException(f"{failed} of {total} could not be read (listed above)")


def _query_file(ctx: click.Context, query: str) -> str | None:
    """The file a query's grid tile shows: the query itself, or an id:N query's stored image."""
    if not query.startswith("id:"):
        return query
    try:
        return _engine(ctx).image(int(query[3:])).path
    except (ValueError, EmbedSearchError):
        return None


def _write_query(fmt: str, result: Any, rows: Rows) -> None:
    if fmt == "json":
        out = {"query": result.query, "model": result.model, "ood_percentile": result.ood_percentile}
        _emit({**out, "warning": result.warning, "results": [asdict(n) for n in result.results]})
        return
    if result.warning:  # on stderr: the rows and paths on stdout stay what a script reads
        click.echo(ood_warning_line(result), err=True)
    if fmt in ("csv", "tsv"):
        rows.write([result.query, result.model, n.rank, n.id, n.path, n.label, n.distance] for n in result.results)
    elif fmt == "paths":
        write_paths(n.path for n in result.results)
    else:
        print_result(result)


@click.command("info", context_settings=CONTEXT)
@format_option(NO_PATHS)
@click.pass_context
def info(ctx: click.Context, fmt: str | None, as_json: bool) -> None:
    """What the library holds: images, models, vectors per index, disk use.

    csv and tsv are key,value rows (models.NAME.vectors, disk_bytes.database, ...).

    \b
    Example:
      embedsearch --home indexes info --json
      embedsearch info --format csv
    """
    fmt = chosen(fmt, as_json)
    data = asdict(_engine(ctx).info())
    if fmt == "json":
        _emit(data)
    elif fmt in ("csv", "tsv"):
        by_name = {**data, "models": {m.pop("name"): m for m in data["models"]}}
        write_rows(fmt, ["key", "value"], flatten(by_name))
    else:
        click.echo(f"library {printable(data['home'])}  ({printable(data['database'])})")
        click.echo(f"images: {data['images']}")
        _print_models(data["models"])
        click.echo("disk: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in data["disk_bytes"].items()))


def _print_models(models: list[dict[str, Any]]) -> None:
    click.echo(f"{'model':<16} {'kind':<7} {'input':<10} {'fit':<4} {'dim':>6} {'metric':<7} {'vectors':>8}  index")
    for m in models:
        shape = f"{m['image_size']}x{m['image_size']}x{m['channels']}"
        click.echo(
            f"{printable(m['name']):<16} {m['kind']:<7} {shape:<10} {m['fit']:<4} {m['dim']:>6} "
            f"{m['metric']:<7} {m['vectors']:>8}  {_index_text(m.get('index') or {})}"
        )


def _index_text(index: dict[str, Any]) -> str:
    """``hnsw M=32 efSearch=48 recall 0.962``, or ``flat`` (exact)."""
    if index.get("type", "flat") == "flat":
        return "flat"
    params = " ".join(f"{k}={v}" for k, v in (index.get("params") or {}).items())
    recall = index.get("recall")
    return f"{index['type']} {params}" + (f" recall {recall:.3f}" if recall is not None else "")


@click.group("models", context_settings=CONTEXT, invoke_without_command=True)
@format_option(NO_PATHS)
@click.pass_context
def models(ctx: click.Context, fmt: str | None, as_json: bool) -> None:
    """List the library's models (csv and tsv: one row per model; index as the table shows it).

    \b
    Example:
      embedsearch models --json
      embedsearch models --format csv
      embedsearch models rm pca
    """
    fmt = chosen(fmt, as_json)
    if ctx.invoked_subcommand is not None:
        return
    data = [asdict(m) for m in _engine(ctx).models()]
    if fmt == "json":
        _emit(data)
    elif fmt in ("csv", "tsv"):
        rows = [[m[c] for c in MODEL_COLUMNS[:-1]] + [_index_text(m.get("index") or {})] for m in data]
        write_rows(fmt, MODEL_COLUMNS, rows)
    else:
        _print_models(data)


@models.command("rm", context_settings=CONTEXT)
@click.argument("name")
@click.pass_context
def models_rm(ctx: click.Context, name: str) -> None:
    """Delete the model NAME: its index, its vectors and its checkpoints. The images stay, in the
    library and in every other model.

    \b
    Example:
      embedsearch models rm pca
    """
    gone = _engine(ctx).delete_model(name)
    click.echo(f"deleted model {printable(repr(gone.name))} ({gone.kind}, {plural(gone.vectors, 'vector')})")
