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
