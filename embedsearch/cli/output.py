"""``--format table|json|csv|tsv|paths``: how the listing commands write their results on stdout.

table is for people (names escaped by :func:`printable`); the others are for programs and exact:
json as before (``--json`` is an alias), csv and tsv with a header row (quoted by the csv module,
so a tab or newline in a file name still parses), paths one file per line for ``xargs`` or an image
viewer. File names that are not valid UTF-8 are written as their bytes on disk in csv, tsv and
paths. Logs and progress stay on stderr whatever the format.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

from embedsearch.cli.context import printable
from embedsearch.results import OOD_PERCENTILE

FORMATS = ["table", "json", "csv", "tsv", "paths"]
#: The formats of commands whose results are not image files (models, info, compare).
NO_PATHS = ["table", "json", "csv", "tsv"]


def format_option(formats: Sequence[str] = FORMATS, json_help: str = "Same as --format json.") -> Any:
    """``--format`` and its ``--json`` alias; the command receives ``fmt`` and ``as_json`` (see :func:`chosen`)."""
    machine = ", ".join(f for f in formats if f != "table")

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        function = click.option("--json", "as_json", is_flag=True, help=json_help)(function)
        return click.option(
            "--format",
            "fmt",
            type=click.Choice(list(formats)),
            default=None,
            help=f"Output on stdout: table (for people, the default) or {machine}.",
        )(function)

    return decorate


def chosen(fmt: str | None, as_json: bool) -> str:
    """The format asked for: ``--json`` is ``--format json``; both, with another format, is a usage error."""
    if as_json and fmt not in (None, "json"):
        raise click.UsageError(f"--json is --format json: give one of --json and --format {fmt}")
    return "json" if as_json else fmt or "table"


def _raw(text: str) -> bytes:
    # The name exactly as on disk, even one that is not valid UTF-8 (surrogateescape, as os.fsdecode made it).
    return text.encode("utf-8", "surrogateescape")


class Rows:
    """csv or tsv on stdout, the header written before the first row (results may stream)."""

    def __init__(self, fmt: str, header: Sequence[str]) -> None:
        self.delimiter = "\t" if fmt == "tsv" else ","
        self.header: Sequence[str] | None = header

    def write(self, rows: Iterable[Sequence[object]]) -> None:
        buf = io.StringIO()
        out = csv.writer(buf, delimiter=self.delimiter, lineterminator="\n")
        if self.header is not None:
            out.writerow(self.header)
            self.header = None
        out.writerows(["" if cell is None else cell for cell in row] for row in rows)
        click.echo(_raw(buf.getvalue()), nl=False)


def write_rows(fmt: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    Rows(fmt, header).write(rows)


def write_paths(paths: Iterable[str | None]) -> None:
    """One path per line (none for a result without a file)."""
    click.echo(b"".join(_raw(p) + b"\n" for p in paths if p), nl=False)


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}, "c": [x, y]}`` -> ``[("a.b", 1), ("c.0", x), ("c.1", y)]``: a document as key,value rows."""
    if isinstance(data, dict):
        items: Iterable[tuple[Any, Any]] = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return [(prefix, data)]
    out: list[tuple[str, Any]] = []
    for key, value in items:
        out += flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 image``, ``2 images``, ``0 images``."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def ood_line(result: Any) -> str:
    """The table's line on how unusual a query is for its model (its ``ood_percentile`` is set)."""
    line = f"novelty: percentile {result.ood_percentile:g} of the model's indexed images"
    return f"{line}, above {OOD_PERCENTILE:g}: out of distribution" if result.warning else line


def ood_warning_line(result: Any) -> str:
    """The one stderr line of a query above the threshold (its ``warning`` is set)."""
    where = f"novelty percentile {result.ood_percentile:g}, above {OOD_PERCENTILE:g}"
    return f"warning: {printable(result.query)}: {result.warning} ({where})"


def print_result(result: Any) -> None:
    """A query's table for people, naming its model; names are escaped (a newline or an ANSI escape in
    a file name stays visible)."""
    click.echo(f"query: {printable(result.query)}")
    click.echo(f"model: {printable(result.model)}")
    if result.ood_percentile is not None:
        click.echo(ood_line(result))
    click.echo(f"{'rank':>5}  {'distance':>10}  {'id':>7}  {'label':<16}  path")
    for n in result.results:
        label = printable(n.label or "-")
        click.echo(f"{n.rank:>5}  {n.distance:>10.4f}  {n.id:>7}  {label:<16}  {printable(n.path)}")
    if not result.results:
        click.echo("  (no results: the index is empty, or nothing in it matches the filters)")
