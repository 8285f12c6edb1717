"""Issue 16.2, CLI conventions: global options anywhere, output formats, image ids as queries, exit
codes, ``models rm``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from embedsearch.cli.main import main


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, command in group.commands.items():
        out.append((*prefix, name))
        if isinstance(command, click.Group):
            out += all_commands(command, (*prefix, name))
    return out


@pytest.mark.no_store
def test_every_command_takes_the_global_options_after_it_and_keeps_h() -> None:
    for path in all_commands(main):
        code, out, _ = invoke(*path, "-h")
        assert code == 0 and "Example" in out or path == ("db",), path
        for option in ("--home", "--db", "-q, --quiet", "-v, --verbose"):
            assert option in out, (path, option)


@pytest.mark.parametrize("where", ["before", "after"])
def test_home_and_db_before_or_after_the_command(
    tmp_path: Path, shapes: Path, database: str | None, where: str
) -> None:
    home = tmp_path / "lib"
    url = database or f"sqlite:///{tmp_path / 'meta.db'}"
    options = ["--home", str(home), "--db", url]

    def cli(*args: str) -> tuple[int, str, str]:
        command, rest = args[0], list(args[1:])
        return invoke(*options, command, *rest) if where == "before" else invoke(command, *rest, *options)

    code, out, _ = cli("index", str(shapes), "--model", "pixels")
    assert code == 0 and "added 48" in out
    assert (home / "indexes").is_dir() and (database is not None or (tmp_path / "meta.db").is_file())
    assert not (home / "library.db").exists()  # --db was used, not HOME's default database
    code, out, _ = cli("info", "--json")
    assert code == 0 and json.loads(out)["images"] == 48 and json.loads(out)["home"] == str(home)
    probe = str(sorted((shapes / "star").iterdir())[0])
    code, out, _ = cli("query", probe, "--model", "pixels", "-k", "1", "--json")
    assert code == 0 and json.loads(out)["results"][0]["path"] == probe


def test_the_value_after_the_command_wins(tmp_path: Path, shapes: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    code, _, _ = invoke("--home", str(first), "index", str(shapes), "--model", "pixels", "--home", str(second))
    assert code == 0 and (second / "indexes").is_dir() and not first.exists()
    code, out, _ = invoke("--home", str(first), "models", "--home", str(second))
    assert code == 0 and "pixels" in out


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_verbose_before_or_after_the_command(
    library_home: Path, shapes: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    def level(*flags: str) -> int:
        base = ["--home", str(library_home)]
        args = ["check"]
        invoke(*base, *flags, *args) if where == "before" else invoke(*base, *args, *flags)
        return logging.getLogger("embedsearch").level

    assert level() == logging.INFO
    assert level("-q") == logging.ERROR
    assert level("--quiet") == logging.ERROR
    assert level("-v") == logging.DEBUG
    assert level("--verbose") == logging.DEBUG
    assert level("-q", "-v") == logging.ERROR  # quiet wins, as before
    # With -q the index summary still comes (stdout), the logs do not (stderr).
    base = ["--home", str(library_home)]
    rest = ["index", str(shapes), "--model", "pixels"]
    code, out, err = invoke(*base, "-q", *rest) if where == "before" else invoke(*base, *rest, "-q")
    assert code == 0 and "unchanged 48" in out and err == ""
