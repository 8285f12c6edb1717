"""Issue 16.2, CLI conventions: global options anywhere, output formats, image ids as queries, exit
codes, ``models rm``."""

from __future__ import annotations

import csv
import io
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


# -- --format ---------------------------------------------------------------------------------


def parse_rows(out: str, fmt: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(out), delimiter="\t" if fmt == "tsv" else ","))


def test_query_in_every_format(library_home: Path, shapes: Path) -> None:
    probes = [str(sorted((shapes / shape).iterdir())[0]) for shape in ("star", "ring")]
    base = ["--home", str(library_home), "query", *probes, "--model", "pixels", "-k", "3"]
    code, out, _ = invoke(*base)
    assert code == 0 and out.splitlines()[:2] == [f"query: {probes[0]}", "model: pixels"]  # the table names it
    code, out, _ = invoke(*base, "--format", "json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [d["query"] for d in lines] == probes and {d["model"] for d in lines} == {"pixels"}
    assert invoke(*base, "--json")[1] == out  # the alias
    for fmt in ("csv", "tsv"):
        code, text, _ = invoke(*base, "--format", fmt)
        rows = parse_rows(text, fmt)
        assert code == 0 and list(rows[0]) == ["query", "model", "rank", "id", "path", "label", "distance"]
        assert [(r["query"], r["rank"]) for r in rows] == [(p, str(i)) for p in probes for i in (1, 2, 3)]
        assert rows[0]["path"] == probes[0] and float(rows[0]["distance"]) == 0.0 and rows[0]["label"] == "star"
        found = [(r["query"], int(r["rank"]), int(r["id"]), r["path"]) for r in rows]
        expected = [(d["query"], n["rank"], n["id"], n["path"]) for d in lines for n in d["results"]]
        assert found == expected
    code, text, err = invoke(*base, "--format", "paths")
    paths = text.splitlines()
    assert code == 0 and paths == [n["path"] for d in lines for n in d["results"]]
    assert all(Path(p).is_file() for p in paths) and err == ""


@pytest.mark.no_store
@pytest.mark.parametrize(
    "args",
    [["query", "x.png", "--model", "p"], ["models"], ["info"], ["duplicates", "--model", "p"], ["compare", "."]],
    ids=lambda args: args[0],
)
def test_json_and_another_format_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    code, _, err = invoke("--home", str(tmp_path / "none"), *args, "--json", "--format", "csv")
    assert code == 2 and "--json is --format json" in err


@pytest.mark.no_store
@pytest.mark.parametrize("command", ["models", "info", "compare"])
def test_paths_only_where_results_are_images(tmp_path: Path, command: str) -> None:
    code, _, err = invoke("--home", str(tmp_path / "none"), command, *(["."] if command == "compare" else []),
                          "--format", "paths")  # fmt: skip
    assert code == 2 and "'paths' is not one of" in err


def test_models_and_info_in_every_format(library_home: Path) -> None:
    base = ["--home", str(library_home)]
    code, out, _ = invoke(*base, "models", "--format", "json")
    models = json.loads(out)
    assert (
        code == 0 and [m["name"] for m in models] == ["pca", "pixels"] and invoke(*base, "models", "--json")[1] == out
    )
    for fmt in ("csv", "tsv"):
        code, out, _ = invoke(*base, "models", "--format", fmt)
        rows = parse_rows(out, fmt)
        assert code == 0 and [r["name"] for r in rows] == ["pca", "pixels"]
        assert [int(r["vectors"]) for r in rows] == [m["vectors"] for m in models] and rows[0]["index"] == "flat"
        assert [int(r["dim"]) for r in rows] == [m["dim"] for m in models]
    code, out, _ = invoke(*base, "info", "--format", "json")
    info = json.loads(out)
    for fmt in ("csv", "tsv"):
        code, out, _ = invoke(*base, "info", "--format", fmt)
        values = {r["key"]: r["value"] for r in parse_rows(out, fmt)}
        assert code == 0 and int(values["images"]) == info["images"] == 49
        assert int(values["models.pixels.vectors"]) == info["models"][1]["vectors"]
        assert int(values["disk_bytes.database"]) == info["disk_bytes"]["database"]


def test_duplicates_in_every_format(tmp_path: Path, home: Path, shapes: Path) -> None:
    star = sorted((shapes / "star").iterdir())[0]
    (shapes / "star" / "copy.png").write_bytes(star.read_bytes())
    base = ["--home", str(home), "duplicates", str(shapes), "--model", "pixels", "--threshold", "0"]
    code, out, _ = invoke(*base, "--format", "json")
    groups = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and groups and invoke(*base, "--json")[1] == out
    members = [im for g in groups for im in g["images"]]
    assert str(shapes / "star" / "copy.png") in {im["path"] for im in members}
    for fmt in ("csv", "tsv"):
        code, out, _ = invoke(*base, "--format", fmt)
        rows = parse_rows(out, fmt)
        assert code == 0 and [(int(r["id"]), r["path"]) for r in rows] == [(im["id"], im["path"]) for im in members]
    assert invoke(*base, "--csv")[1] == invoke(*base, "--format", "csv")[1]  # the old flag stays
    code, out, _ = invoke(*base, "--format", "paths")
    assert code == 0 and out.splitlines() == [im["path"] for im in members]
    assert all(Path(p).is_file() for p in out.splitlines())


def test_compare_as_csv_and_tsv(tmp_path: Path, shapes: Path) -> None:
    base = ["--home", str(tmp_path / "home"), "compare", str(shapes), "--models", "pixels", "-k", "3"]
    for fmt in ("csv", "tsv"):
        code, out, _ = invoke(*base, "--format", fmt)
        rows = parse_rows(out, fmt)
        assert code == 0 and [r["model"] for r in rows] == ["pixels"], out
        assert 0.0 <= float(rows[0]["precision@3"]) <= 1.0 and rows[0]["kind"] == "pixels"
    code, out, _ = invoke(*base, "--format", "json")
    assert code == 0 and set(json.loads(out)["models"]) == {"pixels"}
