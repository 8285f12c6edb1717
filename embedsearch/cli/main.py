"""The ``embedsearch`` command: parse, call one Engine method, render. No logic of its own.

Results go to stdout (tables for people, ``--json`` for machines); progress and logs to stderr.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from embedsearch.cli.context import (
    CONTEXT,
    HELP_DB,
    HELP_HOME,
    HELP_QUIET,
    HELP_VERBOSE,
    add_global_options,
    fit_option,
    log_level,
    printable,
    setup_logging,
    status,
)
from embedsearch.cli.context import emit as _emit
from embedsearch.cli.context import engine as _engine
from embedsearch.cli.output import plural
from embedsearch.errors import EmbedSearchError, from_os_error
from embedsearch.results import METRICS

log = logging.getLogger("embedsearch")
KINDS = ["pixels", "pca", "ae", "vae", "phash", "dhash"]  # kept literal so that --help needs no imports


class _Group(click.Group):
    """Turns the package's own errors into one line on stderr and exit status 1.

    An OSError that no layer below turned into a package error (a bug: each should say what it was
    doing) still ends as one line naming the file and the reason; any other exception (a bug) as one
    line too, with its traceback logged at debug level (-v). Never a traceback by default.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        finally:
            # CPython marks a KeyboardInterrupt that escapes any exec() of a string (dataclasses,
            # namedtuple and SQLAlchemy make code that way, also on first use) as unhandled even
            # when a caller then handles it, and at the exit of ``python -m embedsearch`` ends the
            # process by SIGINT: status -2, not 130 (6 of 60 runs interrupted 0.7-1.1 s in).
            # Every exec() of a string clears that mark before it runs; an empty one, for good.
            exec("")  # noqa: S102

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EmbedSearchError as exc:
            raise click.ClickException(printable(exc)) from None
        except OSError as exc:
            where = f"cannot use {exc.filename}" if exc.filename else "file system error"
            raise click.ClickException(printable(from_os_error(exc, where))) from None
        except click.ClickException as exc:  # click's own, naming a path the user typed
            setattr(exc, "message", printable(exc.message))  # noqa: B010 (click types it Final; it is a plain attribute)
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; what was committed is kept", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # a bug below: still one line; the traceback is for -v and the report
            log.debug("unexpected error", exc_info=True)
            raise click.ClickException(
                printable(f"unexpected error: {type(exc).__name__}: {exc} (a bug; rerun with -v and report it)")
            ) from None


@click.group(cls=_Group, context_settings=CONTEXT)
@click.option(
    "--home",
    envvar="EMBEDSEARCH_HOME",
    default="indexes",
    show_default=True,
    type=click.Path(file_okay=False),
    help=HELP_HOME,
)
@click.option(
    "--db",
    envvar="EMBEDSEARCH_DB",
    default=None,
    help=HELP_DB,
)
@click.option("-q", "--quiet", is_flag=True, help=HELP_QUIET)
@click.option("-v", "--verbose", is_flag=True, help=HELP_VERBOSE)
@click.version_option(package_name="embedsearch")
@click.pass_context
def main(ctx: click.Context, home: str, db: str | None, quiet: bool, verbose: bool) -> None:
    """Image similarity search with autoencoder and VAE embeddings.

    \b
    Example:
      embedsearch demo
      embedsearch index photos/ --model pixels
      embedsearch query photos/cat.png --model pixels -k 5

    The global options (--home, --db, -q, -v) may also follow the command:
    'embedsearch index photos/ --model pixels -q --home lib/'.
    """
    ctx.obj = {"home": home, "db": db, "quiet": quiet, "verbose": verbose}
    setup_logging(log_level(ctx.obj))


@main.command(context_settings=CONTEXT)
@click.argument("data", type=click.Path(exists=True))
@click.option("--model", "kind", required=True, type=click.Choice(KINDS), help="Kind of model to make.")
@click.option("--name", help="Name to register it under (default: the kind).")
@click.option("--image-size", type=click.IntRange(4, 1024), help="Input side in pixels (default: from DATA, <= 64).")
@click.option("--channels", type=click.Choice(["1", "3"]), help="1 grey or 3 RGB (default: grey if all DATA is).")
@fit_option("Resize policy, fixed for the model: pad (whole picture on white) or crop (centred square) [pad].")
@click.option(
    "--metric", type=click.Choice(list(METRICS)), help="Distance [ae/vae: cosine; phash/dhash: hamming; else l2]."
)
@click.option("--dim", type=click.IntRange(1), help="PCA: number of components [32].")
@click.option("--arch", type=click.Choice(["conv", "mlp"]), help="AE/VAE architecture [conv].")
@click.option("--latent-dim", type=click.IntRange(1), help="AE/VAE latent size [32].")
@click.option("--epochs", type=click.IntRange(1), help="AE/VAE epochs [20].")
@click.option("--batch-size", type=click.IntRange(1), help="AE/VAE batch size [256].")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="AE/VAE learning rate (a cosine's peak) [1e-3].")
@click.option(
    "--lr-schedule",
    type=click.Choice(["constant", "cosine"]),  # recipe.LR_SCHEDULES, literal so that --help needs no imports
    help="AE/VAE: constant, or cosine (5%% warm-up to --lr, then down to 0 over --epochs) [constant].",
)
@click.option("--seed", type=int, help="Random seed [0].")
@click.option("--val-fraction", type=click.FloatRange(0, 0.9), help="AE/VAE validation share [0.1].")
@click.option("--likelihood", type=click.Choice(["bernoulli", "gaussian"]), help="VAE reconstruction loss.")
@click.option("--beta", type=click.FloatRange(0), help="VAE weight of the KL term [1].")
@click.option("--kl-warmup", type=click.IntRange(0), help="VAE epochs over which beta ramps up from 0.")
@click.option(
    "--augment",
    is_flag=False,
    flag_value="default",
    metavar="[LIST]",
    help="AE/VAE: augment the encoder's input (crop,shift,rotate,flip,brightness,blur,noise,jpeg; "
    "alone: the default set; 'none': off) [jpeg,crop,brightness,blur,noise].",
)
@click.option(
    "--consistency", type=click.FloatRange(0), help="AE/VAE: weight of the InfoNCE term between two views [30; 0 off]."
)
@click.option("--temperature", type=click.FloatRange(0, min_open=True), help="AE/VAE: InfoNCE temperature [0.1].")
@click.option("--hash-size", type=click.IntRange(2, 32), help="phash/dhash: side of the bit grid [8: 64 bits].")
@click.option("--resume", is_flag=True, help="Continue an interrupted AE/VAE training run.")
@click.option("--replace", is_flag=True, help="Retrain an existing model (its index is emptied).")
@click.pass_context
def train(
    ctx: click.Context,
    data: str,
    kind: str,
    name: str | None,
    image_size: int | None,
    channels: str | None,
    fit: str | None,
    metric: str | None,
    resume: bool,
    replace: bool,
    **options: Any,
) -> None:
    """Make a named model from the images under DATA.

    \b
    Example:
      embedsearch train photos/ --model pca --dim 32
      embedsearch train photos/ --model vae --name vae32 --epochs 10
      embedsearch train photos/ --model ae --augment crop,noise,jpeg --consistency 10
      embedsearch train photos/ --model phash --hash-size 16
      embedsearch train photos/ --model vae --image-size 64 --fit crop
    """
    options = {key: value for key, value in options.items() if value is not None}
    info = _engine(ctx).create_model(
        kind if name is None else name,
        kind,
        data,
        image_size=image_size,
        channels=int(channels) if channels else None,
        metric=metric,
        options=options,
        resume=resume,
        replace=replace,
        fit=fit or "pad",
    )
    click.echo(
        f"model {info.name!r} ({info.kind}, {info.image_size}x{info.image_size}x{info.channels} {info.fit} -> "
        f"{info.dim}-d, {info.metric}) is ready; index with: embedsearch index DATA --model {info.name}"
    )


@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--generated", is_flag=True, help="Remove every generated image (generate --add).")
@click.pass_context
def remove(ctx: click.Context, paths: tuple[str, ...], generated: bool) -> None:
    """Forget indexed images (a folder: every image under it). The files themselves stay.

    \b
    Example:
      embedsearch remove photos/old/
      embedsearch remove --generated
    """
    if not paths and not generated:
        raise click.UsageError("name PATH... to remove, or --generated")
    engine = _engine(ctx)
    removed = (engine.remove(list(paths)) if paths else 0) + (engine.remove_generated() if generated else 0)
    click.echo(f"removed {plural(removed, 'image')}")


@main.command(context_settings=CONTEXT)
@click.option("--per-class", default=40, show_default=True, type=click.IntRange(2, 2000))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1, 1000), help="AE and VAE training.")
@click.pass_context
def demo(ctx: click.Context, per_class: int, seed: int, epochs: int) -> None:
    """Synthetic labelled shapes: train an AE and a VAE, index with pixels, PCA, AE and VAE, score
    each (precision@5), write one picture comparing them. Offline.

    \b
    Example:
      embedsearch --home /tmp/demo demo
    """
    from embedsearch.demo import DemoConfig, run_demo

    outcome = run_demo(_engine(ctx), DemoConfig(per_class=per_class, seed=seed, epochs=epochs))
    for line in outcome.lines:
        click.echo(line)


@main.command(context_settings=CONTEXT)
@click.option("--model", required=True, help="A VAE (or, with --between, an AE) model.")
@click.option("-n", "n", default=16, show_default=True, type=click.IntRange(1, 4096), help="Candidates to draw.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0), help="Prior scale.")
@click.option("--near", metavar="IMAGE", help="Sample around this image (file or image id): z = mu + spread*sigma*eps.")
@click.option("--spread", default=1.0, show_default=True, type=click.FloatRange(0))
@click.option("--between", nargs=2, metavar="A B", help="Decode the path between two images' codes.")
@click.option("--steps", default=8, show_default=True, type=click.IntRange(2, 1000))
@click.option("--slerp", is_flag=True, help="Spherical instead of linear interpolation.")
@click.option("--grid", type=click.Path(dir_okay=False), help="One PNG: candidates (and neighbours) in a grid.")
@click.option("--out", type=click.Path(file_okay=False), help="One PNG + JSON sidecar per candidate.")
@click.option("--search", is_flag=True, help="Find each candidate's nearest indexed real images.")
@click.option("-k", "k", default=5, show_default=True, type=click.IntRange(1, 100), help="Neighbours with --search.")
@click.option("--add", is_flag=True, help="Store the candidates in the library, marked generated.")
@click.option("--include-generated", is_flag=True, help="Let --search return generated images too.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def generate(
    ctx: click.Context,
    model: str,
    n: int,
    seed: int,
    temperature: float,
    near: str | None,
    spread: float,
    between: tuple[str, str] | None,
    steps: int,
    slerp: bool,
    grid: str | None,
    out: str | None,
    search: bool,
    k: int,
    add: bool,
    include_generated: bool,
    as_json: bool,
) -> None:
    """New candidate images from a VAE: from the prior, near an image, or between two images.

    \b
    Example:
      embedsearch generate --model vae -n 16 --grid samples.png
      embedsearch generate --model vae --near photos/cat.png --spread 0.5 --search --grid near.png
      embedsearch generate --model ae --between a.png b.png --steps 8 --slerp --grid path.png
    """
    from embedsearch.core.generate import write_candidates
    from embedsearch.render.pictures import candidates_grid

    result = _engine(ctx).generate(
        model,
        n=n,
        seed=seed,
        temperature=temperature,
        near=near,
        spread=spread,
        between=tuple(between) if between else None,
        steps=steps,
        slerp=slerp,
        search_k=k if search else 0,
        add=add,
        include_generated=include_generated,
    )
    if grid:
        status(ctx, f"wrote {printable(candidates_grid(result, Path(grid)))}")
    if out:
        status(ctx, f"wrote {len(write_candidates(result, Path(out)))} candidates to {printable(out)}")
    if as_json:
        _emit(
            {
                "model": result.model,
                "mode": result.mode,
                "seed": result.seed,
                "sources": result.sources,
                **result.settings,
                "candidates": [
                    {
                        "index": c.index,
                        "id": c.id,
                        "latent": c.latent,
                        "neighbours": [asdict(nb) for nb in c.neighbours],
                    }
                    for c in result.candidates
                ],
            }
        )
        return
    click.echo(
        f"{plural(len(result.candidates), 'candidate')} from {result.model!r} ({result.mode}, seed {result.seed})"
        + (f"; stored as ids {[c.id for c in result.candidates]}" if add else "")
    )
    for cand in result.candidates if search else []:
        near_ones = ", ".join(
            f"{printable(nb.label or '-')} {nb.distance:.3f} {printable(nb.path)}" for nb in cand.neighbours
        )
        click.echo(f"  #{cand.index}: {near_ones}")


@main.command(context_settings=CONTEXT)
@click.option(
    "--repair",
    is_flag=True,
    help="Rebuild index files, re-encode missing or damaged vectors, move stray stored files to lost+found/. "
    "Deletes no image row and no file.",
)
@click.option("--dry-run", is_flag=True, help="With --repair: print what it would do, and do nothing.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def check(ctx: click.Context, repair: bool, dry_run: bool, as_json: bool) -> None:
    """Verify that index, metadata, checkpoints and stored files agree. Exit 0 only when they do.

    \b
    Example:
      embedsearch check
      embedsearch check --repair --dry-run
      embedsearch check --repair --json
    """
    report = _engine(ctx).check(repair, dry_run)
    if as_json:
        _emit(report.to_dict())
    else:
        for name, m in report.models.items():
            in_file = f"{plural(m.vectors_in_file, 'vector')} in its index file"
            entries = plural(m.entries, "entry", "entries")
            click.echo(f"{printable(name)}: {entries}, {in_file}, checkpoint {m.checkpoint}")
        for line in report.repaired:
            click.echo(f"repaired: {printable(line)}")
        for line in report.planned:
            click.echo(f"would repair: {printable(line)}")
        for line in report.notes:
            click.echo(f"note: {printable(line)}")
        for line in report.problems:
            click.echo(f"problem: {printable(line)}")
        click.echo("consistent" if report.ok else "NOT consistent; run 'embedsearch check --repair'")
    ctx.exit(0 if report.ok else 1)


@main.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--model", required=True, help="An AE or VAE model.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.pass_context
def reconstruct(ctx: click.Context, images: tuple[str, ...], model: str, out: str) -> None:
    """Write a grid: the IMAGEs (at the model's input) above their reconstructions.

    \b
    Example:
      embedsearch reconstruct cat.png dog.png --model vae --out recon.png
    """
    from embedsearch.render.pictures import reconstruction_grid

    originals, recons, used = _engine(ctx).reconstruct(list(images), model)
    click.echo(f"wrote {printable(reconstruction_grid(originals, recons, used, Path(out)))}")


@main.group(context_settings=CONTEXT)
def db() -> None:
    """Database maintenance."""


@db.command("upgrade", context_settings=CONTEXT)
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply the schema migrations (opening a library does this too).

    \b
    Example:
      embedsearch --db postgresql://localhost/images db upgrade
    """
    engine = _engine(ctx)
    engine.open(create=True)
    click.echo(f"{printable(engine.db_url)}: schema is at the newest revision")


def _register_commands() -> None:
    """Commands that live in their own modules (imported lazily by their bodies)."""
    from embedsearch.cli.compare import compare, export_images
    from embedsearch.cli.duplicates import duplicates
    from embedsearch.cli.indexing import index, reindex
    from embedsearch.cli.listing import info, models, query
    from embedsearch.cli.serve import serve

    main.add_command(serve)
    main.add_command(compare)
    main.add_command(export_images, "export-images")
    main.add_command(duplicates)
    main.add_command(index)
    main.add_command(reindex)
    main.add_command(query)
    main.add_command(info)
    main.add_command(models)
    for command in main.commands.values():  # last: every command, wherever it is defined
        add_global_options(command)


_register_commands()
