"""What every command module shares: click settings, the opened Engine, JSON output.

The commands live in one module per group (``main``, ``compare``, ``serve``); each imports this
module, never another command module, so that there is no import circle among them.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from embedsearch.engine import Engine

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


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


def emit(data: Any) -> None:
    """One JSON document on stdout."""
    click.echo(json.dumps(data, ensure_ascii=False))
