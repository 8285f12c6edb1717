"""Issue 16.2, CLI conventions: global options anywhere, output formats, image ids as queries, exit
codes, ``models rm``."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from embedsearch.cli.main import main
from embedsearch.engine import Engine
from embedsearch.results import QueryResult
from helpers import noise_image, png_bytes


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


# -- id:N as a query; exit codes ---------------------------------------------------------------


def query_json(home: Path, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    code, out, err = invoke("--home", str(home), "query", *args, "--json")
    return code, [json.loads(line) for line in out.splitlines()], err


def test_query_by_image_id_is_the_stored_image(library_home: Path, shapes: Path) -> None:
    probe = str(sorted((shapes / "star").iterdir())[0])
    for model in ("pixels", "pca"):
        code, by_path, _ = query_json(library_home, probe, "--model", model, "-k", "4")
        image_id = by_path[0]["results"][0]["id"]  # the probe is indexed: its own nearest
        code, by_id, err = query_json(library_home, f"id:{image_id}", "--model", model, "-k", "4")
        assert code == 0 and err == "" and by_id[0]["query"] == f"id:{image_id}"
        assert [n["id"] for n in by_id[0]["results"]] == [n["id"] for n in by_path[0]["results"]]
        assert by_id[0]["results"][0]["distance"] == pytest.approx(0.0, abs=1e-5)
    with Engine(library_home) as engine:  # the API takes the same items
        (result,) = engine.query([f"id:{image_id}"], "pixels", k=2)
        assert isinstance(result, QueryResult) and result.results[0].id == image_id


def test_an_id_not_in_the_models_index_is_read_from_its_file(library_home: Path) -> None:
    with Engine(library_home) as engine:
        added = engine.add_image(png_bytes(noise_image(5, 32)), label="only-pixels", models=["pixels"])
        assert engine.store.entry_ids_of(engine.model("pca").id, [added.id]) == set()
    code, results, err = query_json(library_home, f"id:{added.id}", "--model", "pca", "-k", "3")
    assert code == 0 and err == "" and len(results[0]["results"]) == 3
    assert added.id not in {n["id"] for n in results[0]["results"]}  # it is not in pca's index


@pytest.mark.parametrize("fmt", ["table", "json", "csv", "paths", "grid"])
def test_query_prints_every_good_result_then_exits_1(
    tmp_path: Path, library_home: Path, shapes: Path, fmt: str
) -> None:
    good = [str(sorted((shapes / s).iterdir())[0]) for s in ("star", "ring")]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    args = ["--home", str(library_home), "query", good[0], str(bad), "id:99999", good[1], "--model", "pixels"]
    grid = tmp_path / "grid.png"
    extra = ["--grid", str(grid)] if fmt == "grid" else ["--format", fmt]
    code, out, err = invoke(*args, "-k", "2", *extra)
    assert code == 1
    lines = err.splitlines()
    assert lines[-1] == "Error: 2 of 4 query images could not be read (listed above)"
    assert f"skipped {bad}: " in err and "skipped id:99999: no image with id 99999" in err
    if fmt == "json":
        assert [json.loads(line)["query"] for line in out.splitlines()] == good
    elif fmt == "csv":
        assert [r["query"] for r in parse_rows(out, fmt)] == [good[0]] * 2 + [good[1]] * 2
    elif fmt == "paths":
        assert len(out.splitlines()) == 4 and out.splitlines()[0] == good[0]
    else:
        assert [line for line in out.splitlines() if line.startswith("query: ")] == [f"query: {g}" for g in good]
    if fmt == "grid":
        assert grid.is_file()
    code, out, err = invoke(*args[:4], good[1], "--model", "pixels", *extra)
    assert code == 0 and "Error" not in err


def test_exit_codes(tmp_path: Path, library_home: Path, shapes: Path) -> None:
    """0: done; 1: some or all input failed, or the library refused (one line); 2: a usage error."""
    probe = str(sorted((shapes / "star").iterdir())[0])
    home = ["--home", str(library_home)]
    assert invoke(*home, "query", probe, "--model", "pixels")[0] == 0
    assert invoke(*home, "query", "id:99999", "--model", "pixels")[0] == 1
    assert invoke(*home, "query", str(tmp_path / "missing.png"), "--model", "pixels")[0] == 1
    assert invoke(*home, "query", probe, "--model", "nope")[0] == 1
    assert invoke(*home, "query", probe, "--model", "pixels", "-k", "0")[0] == 2
    assert invoke(*home, "query", probe)[0] == 2  # --model missing
    assert invoke(*home, "query", probe, "--model", "pixels", "--bogus")[0] == 2
    assert invoke(*home, "nosuchcommand")[0] == 2


# -- models rm; singular and plural ---------------------------------------------------------------


def test_models_rm_deletes_a_model_and_keeps_the_images(library_home: Path, shapes: Path) -> None:
    home = ["--home", str(library_home)]
    with Engine(library_home) as engine:
        model_dir = engine.model_dir("pca")
        assert model_dir.is_dir()
    code, out, err = invoke(*home, "models", "rm", "pca")
    assert (code, out, err) == (0, "deleted model 'pca' (pca, 49 vectors)\n", "")
    code, out, _ = invoke(*home, "models", "--json")
    assert code == 0 and [m["name"] for m in json.loads(out)] == ["pixels"] and not model_dir.exists()
    code, out, _ = invoke(*home, "info", "--json")
    assert json.loads(out)["images"] == 49  # the images stay, with their pixels vectors
    code, _, err = invoke(*home, "models", "rm", "pca")
    assert code == 1 and err.startswith("Error: unknown model 'pca' (known models: pixels)") and err.count("\n") == 1
    assert invoke(*home, "query", str(sorted((shapes / "star").iterdir())[0]), "--model", "pca")[0] == 1
    assert invoke(*home, "models", "rm")[0] == 2  # NAME is required
    code, out, _ = invoke(*home, "models", "rm", "pixels", "-q")  # global options after it, too
    assert code == 0 and "49 vectors" in out


def test_messages_say_1_image_and_2_images(tmp_path: Path, home: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes(png_bytes(noise_image(1, 16)))
    code, out, _ = invoke("--home", str(home), "index", str(one), "--model", "pixels")
    assert code == 0 and out.startswith("1 file, model 'pixels': added 1,")
    (one / "b.png").write_bytes(png_bytes(noise_image(2, 16)))
    code, out, _ = invoke("--home", str(home), "index", str(one), "--model", "pixels")
    assert code == 0 and out.startswith("2 files, model 'pixels': added 1,")
    code, out, _ = invoke("--home", str(home), "check")
    assert code == 0 and out.startswith("pixels: 2 entries, 2 vectors in its index file")
    code, out, _ = invoke("--home", str(home), "remove", str(one / "a.png"))
    assert (code, out) == (0, "removed 1 image\n")
    code, out, _ = invoke("--home", str(home), "check")
    assert code == 0 and out.startswith("pixels: 1 entry, 1 vector in its index file")
    code, out, _ = invoke("--home", str(home), "models", "rm", "pixels")
    assert (code, out) == (0, "deleted model 'pixels' (pixels, 1 vector)\n")


# -- --label and --under -------------------------------------------------------------------------


def test_query_filters_by_label_and_path(library_home: Path, shapes: Path) -> None:
    probe = str(sorted((shapes / "star").iterdir())[0])
    code, everything, _ = query_json(library_home, probe, "--model", "pixels", "-k", "49")
    assert code == 0 and len(everything[0]["results"]) == 49
    ranked = everything[0]["results"]
    code, ring, _ = query_json(library_home, probe, "--model", "pixels", "-k", "4", "--label", "ring")
    # The same order and distances as the unfiltered ranking, with every other label taken out.
    expected = [(n["id"], n["distance"]) for n in ranked if n["label"] == "ring"][:4]
    assert code == 0 and [(n["id"], n["distance"]) for n in ring[0]["results"]] == expected
    code, under, _ = query_json(library_home, probe, "--model", "pixels", "-k", "10", "--under", str(shapes / "ring"))
    assert code == 0 and len(under[0]["results"]) == 6  # all six, and only them
    assert {Path(n["path"]).parent for n in under[0]["results"]} == {shapes / "ring"}
    code, both, _ = query_json(
        library_home, probe, "--model", "pixels", "--label", "ring", "--under", str(shapes / "star")
    )
    assert code == 0 and both[0]["results"] == []  # no image is both
    code, out, _ = invoke("--home", str(library_home), "query", probe, "--model", "pixels", "--label", "nope")
    assert code == 0 and "(no results: the index is empty, or nothing in it matches the filters)" in out


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivfpq"])
def test_filters_in_the_api_on_every_index_type(library: Engine, shapes: Path, index: str) -> None:
    if index != "flat":
        library.reindex("pixels", index)
    probe = sorted((shapes / "star").iterdir())[0]
    (result,) = library.query([str(probe)], "pixels", k=5, label="triangle")
    assert [n.label for n in result.results] == ["triangle"] * 5
    own = result.results[0].id
    hits = library.search_image(own, "pixels", k=3, under=str(shapes / "ring"))
    assert len(hits) == 3 and all(Path(str(n.path)).parent == shapes / "ring" for n in hits)
    hits = library.search_bytes(probe.read_bytes(), "pixels", k=3, label="upload")
    assert [n.label for n in hits] == ["upload"]  # the one upload, however far
    assert library.search_image(own, "pixels", k=3, label="nothing-has-this") == []


# -- index: files gone from disk, --prune ----------------------------------------------------------


def test_index_lists_files_gone_from_disk_and_prune_forgets_them(home: Path, shapes: Path) -> None:
    base = ["--home", str(home), "index", str(shapes), "--model", "pixels"]
    assert invoke(*base)[0] == 0
    gone = sorted((shapes / "ring").iterdir())[:2]
    for path in gone:
        path.unlink()
    moved = sorted((shapes / "star").iterdir())[0]
    moved.rename(moved.with_name("renamed.png"))  # moved, not gone: its image follows it
    broken = sorted((shapes / "cross").iterdir())[0]
    broken.write_bytes(b"no longer an image")  # still on disk: failed, not gone
    code, out, _ = invoke(*base)
    lines = out.splitlines()
    assert code == 0 and [line for line in lines if line.startswith("gone: ")] == [f"gone: {p}" for p in gone]
    assert "2 indexed files no longer on disk, kept; 'index --prune' forgets them" in lines
    assert f"failed: {broken}: " in out
    code, out, _ = invoke(*base, "--json")
    report = json.loads(out)
    assert code == 0 and report["missing"] == [str(p) for p in gone] and report["pruned"] == 0
    code, out, _ = invoke("--home", str(home), "info", "--json")
    assert json.loads(out)["images"] == 48  # kept until asked

    code, out, _ = invoke(*base, "--prune")
    assert code == 0 and "2 indexed files no longer on disk: forgot 2 images" in out
    code, out, _ = invoke("--home", str(home), "info", "--json")
    assert json.loads(out)["images"] == 46
    code, out, _ = invoke(*base, "--json")
    assert code == 0 and json.loads(out)["missing"] == []
    code, out, _ = invoke(*base)
    assert code == 0 and not [line for line in out.splitlines() if line.startswith("gone: ")]


def test_index_prune_in_the_api_removes_from_every_model(engine: Engine, shapes: Path) -> None:
    engine.index(str(shapes), "pixels")
    engine.create_model("pca", "pca", str(shapes), options={"dim": 4})
    engine.index(str(shapes), "pca")
    victim = sorted((shapes / "ring").iterdir())[0]
    victim.unlink()
    pixels, pca = engine.index_models(str(shapes), ["pixels", "pca"], prune=True)
    assert pixels.missing == pca.missing == [str(victim)] and pixels.pruned == pca.pruned == 1
    assert {m.name: m.vectors for m in engine.models()} == {"pca": 47, "pixels": 47}
    assert engine.index(str(shapes / "star"), "pixels").missing == []  # only the folder indexed counts


def test_a_ctrl_c_logged_by_sqlalchemy_is_left_to_the_commands_own_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A Ctrl+C during a connection's return to the pool: SQLAlchemy logs it with a traceback, then
    re-raises it; only the command's "interrupted" line should reach the terminal."""
    import logging

    from embedsearch.cli.context import setup_logging

    setup_logging(logging.INFO)
    pool = logging.getLogger("sqlalchemy.pool.impl.QueuePool")
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        pool.error("Exception during reset or similar", exc_info=True)
    try:
        raise ValueError("a real problem")
    except ValueError:
        pool.error("Exception during reset or similar", exc_info=True)
    err = capsys.readouterr().err
    assert "KeyboardInterrupt" not in err and "ValueError: a real problem" in err
