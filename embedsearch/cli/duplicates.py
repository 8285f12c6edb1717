"""The ``duplicates`` command: parse, call :meth:`Engine.duplicates`, render. The main group registers it."""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

from embedsearch.cli.context import CONTEXT, emit, printable
from embedsearch.cli.context import engine as _engine

if TYPE_CHECKING:
    from embedsearch.core.dedup import DuplicateReport


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
@click.option("--json", "as_json", is_flag=True, help="One JSON object per group per line.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV rows group,id,path,distance (one per image).")
@click.option("--grid", type=click.Path(dir_okay=False), help="Write a PNG with a row per group (the 50 largest).")
@click.pass_context
def duplicates(
    ctx: click.Context,
    data: str | None,
    model: str,
    threshold: float | None,
    k: int | None,
    as_json: bool,
    as_csv: bool,
    grid: str | None,
) -> None:
    """Groups of near-duplicate images in the library (DATA: index that folder first, and find the
    exact copies among its files too).

    Each group lists its first image (lowest id) and the others with their distance to it. Exact
    copies (the same bytes) have distance 0 and the stored image's id.

    \b
    Example:
      embedsearch duplicates photos/ --model pixels --grid dups.png
      embedsearch duplicates --model pca --threshold 0.8 --csv > dups.csv
      embedsearch duplicates --model vae --k 2 --json > groups.jsonl
    """
    if threshold is not None and k is not None:
        raise click.UsageError("give --threshold or --k, not both")
    if as_json and as_csv:
        raise click.UsageError("give --json or --csv, not both")
    progress = not (ctx.find_object(dict) or {}).get("quiet") and sys.stderr.isatty()
    kwargs = {"progress": progress} if data is not None else {}
    report = _engine(ctx).duplicates(model, threshold, k, data, **kwargs)
    if report.threshold is None:
        how = f"mutual {report.k}-NN"
    else:
        how = f"threshold {report.threshold:.4g}" + (" (calibrated)" if report.calibrated else "")
    click.echo(
        f"{len(report.groups)} groups of {report.vectors} images, model {printable(repr(model))} "
        f"({report.metric}, {how}, {report.method}, {report.exact_copies} exact copies) in {report.seconds:.1f} s",
        err=True,
    )
    if as_json:
        for group in report.groups:
            emit(asdict(group))
    elif as_csv:
        _write_csv(report)
    else:
        for group in report.groups:
            first, *rest = group.images
            others = ", ".join(f"{printable(im.path)} (id {im.id}, {im.distance:.4f})" for im in rest)
            click.echo(f"group {group.group}: {printable(first.path)} (id {first.id}); {others}")
    if grid:
        from embedsearch.render.duplicates import duplicates_grid

        click.echo(f"wrote {printable(duplicates_grid(report.groups, Path(grid)))}", err=True)


def _write_csv(report: DuplicateReport) -> None:
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["group", "id", "path", "distance"])
    for group in report.groups:
        out.writerows([group.group, im.id, im.path or "", f"{im.distance:.6g}"] for im in group.images)
    # The file names exactly as they are on disk, even those that are not valid UTF-8.
    click.echo(buf.getvalue().encode("utf-8", "surrogateescape"), nl=False)
