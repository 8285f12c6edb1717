"""The ``duplicates`` command: parse, call :meth:`Engine.duplicates`, render. The main group registers it."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import click

from embedsearch.cli.context import CONTEXT, emit, printable, status
from embedsearch.cli.context import engine as _engine
from embedsearch.cli.output import chosen, format_option, plural, write_paths, write_rows


@click.command("duplicates", context_settings=CONTEXT)
@click.argument("data", required=False, type=click.Path(exists=True))
@click.option("--model", required=True, help="Model whose index to group ('pixels' is created on first use with DATA).")
@click.option(
    "--threshold",
    type=click.FloatRange(0),
    help="Largest distance within a pair, in the model's own distance (as 'query' shows it); "
    "default: calibrated from the library (see README).",
)
@click.option(
    "--k", "k", type=click.IntRange(1, 1000), help="Instead of a threshold: pair images that are each among "
    "the other's K nearest neighbours (mutual K-NN)."
)  # fmt: skip
@format_option(json_help="Same as --format json: one JSON object per group per line.")
@click.option("--csv", "as_csv", is_flag=True, help="Same as --format csv: rows group,id,path,distance, one per image.")
@click.option("--grid", type=click.Path(dir_okay=False), help="Write a PNG with a row per group (the 50 largest).")
@click.pass_context
def duplicates(
    ctx: click.Context,
    data: str | None,
    model: str,
    threshold: float | None,
    k: int | None,
    fmt: str | None,
    as_json: bool,
    as_csv: bool,
    grid: str | None,
) -> None:
    """Groups of near-duplicate images in the library (DATA: index that folder first, and find the
    exact copies among its files too).

    Each group lists its first image (lowest id) and the others with their distance to it. Exact
    copies (the same bytes) have distance 0 and the stored image's id. csv and tsv have a row per
    image (group, id, path, distance); paths every image of every group, each group's first included.

    \b
    Example:
      embedsearch duplicates photos/ --model pixels --grid dups.png
      embedsearch duplicates --model pca --threshold 0.8 --format csv > dups.csv
      embedsearch duplicates --model vae --k 2 --json > groups.jsonl
    """
    if threshold is not None and k is not None:
        raise click.UsageError("give --threshold or --k, not both")
    if as_csv and (as_json or fmt not in (None, "csv")):
        raise click.UsageError("--csv is --format csv: give one output format, not both")
    fmt = "csv" if as_csv else chosen(fmt, as_json)
    progress = not (ctx.find_object(dict) or {}).get("quiet") and sys.stderr.isatty()
    kwargs = {"progress": progress} if data is not None else {}
    report = _engine(ctx).duplicates(model, threshold, k, data, **kwargs)
    if report.threshold is None:
        how = f"mutual {report.k}-NN"
    else:
        how = f"threshold {report.threshold:.4g}" + (" (calibrated)" if report.calibrated else "")
    copies = plural(report.exact_copies, "exact copy", "exact copies")
    click.echo(
        f"{plural(len(report.groups), 'group')} of {plural(report.vectors, 'image')}, model {printable(repr(model))} "
        f"({report.metric}, {how}, {report.method}, {copies}) in {report.seconds:.1f} s",
        err=True,
    )
    if fmt == "json":
        for group in report.groups:
            emit(asdict(group))
    elif fmt in ("csv", "tsv"):
        rows = ([g.group, im.id, im.path, f"{im.distance:.6g}"] for g in report.groups for im in g.images)
        write_rows(fmt, ["group", "id", "path", "distance"], rows)
    elif fmt == "paths":
        write_paths(im.path for g in report.groups for im in g.images)
    else:
        for group in report.groups:
            first, *rest = group.images
            others = ", ".join(f"{printable(im.path)} (id {im.id}, {im.distance:.4f})" for im in rest)
            click.echo(f"group {group.group}: {printable(first.path)} (id {first.id}); {others}")
    if grid:
        from embedsearch.render.duplicates import duplicates_grid

        status(ctx, f"wrote {printable(duplicates_grid(report.groups, Path(grid)))}")
