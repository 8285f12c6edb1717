"""What every command module shares: click settings, the opened Engine, JSON output.

The commands live in one module per group (``main``, ``compare``, ``serve``); each imports this
module, never another command module, so that there is no import circle among them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import unicodedata
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from embedsearch.engine import Engine

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
#: The resize policies (embedsearch.data.resize.FITS), literal so that --help needs no imports.
FITS = ["pad", "crop"]


def fit_option(help_text: str) -> Any:
    """``--fit pad|crop``: the resize policy of a model made by the command."""
    return click.option("--fit", type=click.Choice(FITS), default=None, help=help_text)


HELP_HOME = "Library folder (env EMBEDSEARCH_HOME)."
HELP_DB = "SQLAlchemy URL of the metadata database (env EMBEDSEARCH_DB); default: HOME/library.db."
HELP_QUIET = "Only errors on stderr: no progress, no logs."
HELP_VERBOSE = "Debug logs on stderr."


def log_level(obj: dict[str, Any]) -> int:
    """-q wins over -v, wherever each was given."""
    return logging.ERROR if obj.get("quiet") else logging.DEBUG if obj.get("verbose") else logging.INFO


def _set_global(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A global option given after the subcommand: it overrides the one before (or the environment)."""
    if value is None or value is False:
        return
    assert param.name is not None
    obj = settings(ctx)
    obj[param.name] = value
    if param.name in ("quiet", "verbose"):
        setup_logging(log_level(obj))


def global_options() -> list[click.Option]:
    """``--home``, ``--db``, ``-q``, ``-v`` for a subcommand, so that they work after it as well as
    before (``embedsearch index DATA --model pixels -q``). They are not passed to the command's
    function: they write into the group's settings (ctx.obj), the value given after the subcommand
    winning; no default and no environment here (the group applied those already)."""
    common: dict[str, Any] = {"expose_value": False, "callback": _set_global}
    return [
        click.Option(["--home"], type=click.Path(file_okay=False), help=HELP_HOME, **common),
        click.Option(["--db"], help=HELP_DB, **common),
        click.Option(["-q", "--quiet"], is_flag=True, help=HELP_QUIET, **common),
        click.Option(["-v", "--verbose"], is_flag=True, help=HELP_VERBOSE, **common),
    ]


def add_global_options(command: click.Command) -> None:
    """The global options on ``command`` and, for a group, on each of its subcommands (recursively)."""
    names = {name for p in command.params for name in p.opts}
    if not names & {"--home", "--db", "--quiet", "--verbose", "-q", "-v"}:
        command.params.extend(global_options())
    for sub in getattr(command, "commands", {}).values():
        add_global_options(sub)


def status(ctx: click.Context, text: str) -> None:
    """A line for people on stderr ("wrote grid.png"), which -q silences like progress and logs."""
    if not settings(ctx).get("quiet"):
        click.echo(text, err=True)


def settings(ctx: click.Context) -> dict[str, Any]:
    """The main group's settings, or the environment's when a command runs on its own."""
    obj = ctx.find_object(dict)
    if obj is None:
        obj = ctx.ensure_object(dict)
        obj.update(home=os.environ.get("EMBEDSEARCH_HOME") or "indexes", db=os.environ.get("EMBEDSEARCH_DB"))
    return obj


def engine(ctx: click.Context) -> Engine:
    """The library named by the global options, opened once per command and closed when it ends."""
    from embedsearch.engine import Engine

    obj = settings(ctx)
    if "engine" not in obj:
        obj["engine"] = ctx.with_resource(Engine(obj.get("home"), obj.get("db")))
    engine: Engine = obj["engine"]
    return engine


#: Characters json.dumps leaves raw that must not reach a terminal or a strict UTF-8 reader: lone
#: surrogates (file names that are not valid UTF-8), DEL and the C1 controls, the JS line separators.
_RAW_IN_JSON = re.compile("[\ud800-\udfff\x7f-\x9f\u2028\u2029]")
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def emit(data: Any) -> None:
    """One JSON document on stdout, exact: such characters are written as \\uXXXX escapes."""
    text = json.dumps(data, ensure_ascii=False)
    click.echo(_RAW_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


def _escape(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a name that is not UTF-8 (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    if c in _NAMED:
        return _NAMED[c]
    category = unicodedata.category(c)
    if category == "Cc":
        return f"\\x{code:02x}"
    if category == "Cs" or c in _BIDI:
        return f"\\u{code:04x}"
    return c


def printable(text: object) -> str:
    """``text`` safe for a terminal, on one line: control characters (newlines, ANSI escapes), bidi
    overrides and bytes of non-UTF-8 names are shown as escapes. For tables and messages; --json is exact."""
    text = str(text)
    return text if text.isprintable() else "".join(_escape(c) for c in text)


class PrintableFormatter(logging.Formatter):
    """Log lines on stderr, one line each, escaped like :func:`printable`."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def setup_logging(level: int) -> None:
    """The package's log lines on stderr at ``level`` (the main command; each ``serve`` worker process)."""
    log = logging.getLogger("embedsearch")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    # SQLAlchemy logs a Ctrl+C that lands while it returns a connection to its pool ("Exception during
    # reset or similar", with a traceback) before re-raising it; the command reports the interrupt
    # itself in one line. Its other warnings and errors still reach stderr as before.
    library = logging.StreamHandler(sys.stderr)
    library.setLevel(logging.WARNING)
    library.addFilter(_not_an_interrupt)
    sqlalchemy = logging.getLogger("sqlalchemy")
    sqlalchemy.handlers[:] = [library]
    sqlalchemy.propagate = False


def _not_an_interrupt(record: logging.LogRecord) -> bool:
    kind = record.exc_info[0] if record.exc_info else None
    return not (kind is not None and issubclass(kind, KeyboardInterrupt))
