"""``embedsearch serve``: the HTTP API and the web page on uvicorn (registered by ``cli.py``)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from typing import TYPE_CHECKING

import click

from embedsearch.cli.context import CONTEXT, settings, setup_logging
from embedsearch.cli.context import engine as _engine

if TYPE_CHECKING:
    from fastapi import FastAPI

    from embedsearch.http.workers import ServeConfig

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def served_names(host: str, allowed: tuple[str, ...]) -> list[str]:
    """The Host names to answer besides the loopback ones: ``--host`` and ``--allow-host``.

    ``0.0.0.0`` and ``::`` name no host, so the machine's own name stands for them; an address or
    other name clients use must be given with ``--allow-host`` (nothing else can tell a name
    pointed here on purpose from one an attacker's DNS points here).
    """
    any_interface = host in ("0.0.0.0", "::", "")
    return [socket.gethostname() if any_interface else host, *allowed]


def worker_count(n: int) -> int:
    """``--workers``: at least 1 (refused in one line); more than the cores is allowed, with a warning."""
    cores = os.cpu_count() or 1
    if n < 1:
        raise click.ClickException(f"--workers must be at least 1, not {n} (one per core: {cores} on this machine)")
    if n > cores:
        log.warning(
            "%d workers on %d cores: they take turns on the cores, so more than one per core adds no capacity", n, cores
        )
    return n


@click.command(context_settings=CONTEXT)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (loopback only by default; 0.0.0.0 for every interface).",
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--token",
    envvar="EMBEDSEARCH_TOKEN",
    default=None,
    help="Writes (upload, delete, generate with add) need 'Authorization: Bearer TOKEN' (env EMBEDSEARCH_TOKEN).",
)
@click.option("--token-for-reads", is_flag=True, help="Every API call but /api/health needs the token.")
@click.option(
    "--max-upload-mb",
    default=20.0,
    show_default=True,
    type=click.FloatRange(0.001, 10_000),
    help="Largest request body (an upload of one or more images), in MB.",
)
@click.option(
    "--max-query-pixels",
    default=16_000_000,  # http.state.DEFAULT_MAX_QUERY_PIXELS (importing it would load starlette for every command)
    show_default=True,
    type=click.IntRange(1),
    help="Largest search image (width x height), refused from its header; stored uploads keep the library's limit.",
)
@click.option(
    "--max-decodes",
    type=click.IntRange(1),
    help="Large images (over 1 MP) decoded at once, per worker process; more wait 1 s, then get 503 "
    "(default: cores - 1 shared by the workers, at least 1 each).",
)
@click.option(
    "--max-requests",
    default=32,  # http.state.DEFAULT_MAX_REQUESTS
    show_default=True,
    type=click.IntRange(1),
    help="Requests in progress at once, per worker process; more get 503 with Retry-After at once "
    "(with --max-upload-mb, a bound on the memory clients can make the service hold).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=int,
    callback=lambda _ctx, _param, n: worker_count(n),
    help="Service processes, each with its own engine over the library (one per core uses them all); writes "
    "take turns on the library lock and each process sees the others' changes within about 2 s.",
)
@click.option(
    "--allow-host",
    multiple=True,
    metavar="NAME",
    help="Also answer requests for this host name (repeatable); besides localhost, 127.0.0.1, ::1, --host "
    "and, with --host 0.0.0.0 or ::, this machine's name. Others get 421 (DNS rebinding).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    token: str | None,
    token_for_reads: bool,
    max_upload_mb: float,
    max_query_pixels: int,
    max_decodes: int | None,
    max_requests: int,
    allow_host: tuple[str, ...],
    workers: int,
) -> None:
    """Serve the library over HTTP: a JSON API (docs at /docs) and a search page at /.

    \b
    Example:
      embedsearch --home indexes serve --port 8000
      EMBEDSEARCH_TOKEN=s3cret embedsearch serve --host 0.0.0.0 --workers 2
    """
    import uvicorn

    from embedsearch.http.state import default_decodes
    from embedsearch.http.workers import ServeConfig, run_workers, service_app
    from embedsearch.malloc import return_large_buffers

    # Requests are small and many run at once: one torch thread each beats two threads fighting
    # over two cores for every single image (an explicit OMP_NUM_THREADS still wins). Workers inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    token = token or None
    if token_for_reads and token is None:
        raise click.UsageError("--token-for-reads needs --token (or EMBEDSEARCH_TOKEN)")
    if token is None and not is_loopback(host):
        log.warning("serving on %s without a token: anyone who can reach it can add and delete images", host)
    engine = _engine(ctx)
    # A read face: it never starts a library (uploads into one without models could not work anyway).
    engine.open()
    names = served_names(host, allow_host)
    log.info("answering requests for localhost, 127.0.0.1, [::1] and %s (others: 421)", ", ".join(names))
    quiet = bool(ctx.obj.get("quiet"))
    config = ServeConfig(
        home=str(engine.home),
        db=settings(ctx).get("db"),
        token=token,
        token_for_reads=token_for_reads,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_query_pixels=max_query_pixels,
        max_decodes=max_decodes if max_decodes is not None else default_decodes(workers),
        max_requests=max_requests,
        allowed_hosts=tuple(names),
        log_level=logging.getLogger("embedsearch").level or logging.INFO,
    )
    shown = f"[{host}]" if ":" in host else host
    if not quiet:
        each = f" in {workers} processes" if workers > 1 else ""
        click.echo(f"serving {engine.home} at http://{shown}:{port}/{each} (API docs at /docs); Ctrl+C stops", err=True)
    level = "warning" if quiet else "info"
    if workers == 1:
        return_large_buffers()  # freed decodes go back to the system, not to 40 threads' malloc arenas
        uvicorn.run(service_app(config, engine), host=host, port=port, log_level=level)
        return
    engine.close()  # each worker opens its own; this one only showed that the library is there
    run_workers(config, worker_app, host, port, workers, level)


def worker_app(config: ServeConfig) -> FastAPI:
    """The app of one ``serve --workers N`` process, built in it: a new process, so it first sets
    itself up as ``serve`` did (logging, memory), then opens its own Engine."""
    from embedsearch.http.workers import service_app
    from embedsearch.malloc import return_large_buffers

    setup_logging(config.log_level)
    return_large_buffers()
    return service_app(config)
