from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from embedsearch.cli.main import main
from embedsearch.engine import Engine
from helpers import noise_image, png_bytes

COMMANDS = [
    "index",
    "query",
    "train",
    "remove",
    "info",
    "models",
    "demo",
    "db upgrade",
    "generate",
    "check",
    "serve",
    "compare",
    "export-images",
    "reconstruct",
    "duplicates",
]


def run(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--home", str(home), *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(main, [*command.split(), "-h"])
    assert result.exit_code == 0 and "Example" in result.output


def test_index_query_info_remove_end_to_end(tmp_path: Path, home: Path, shapes: Path) -> None:
    code, out, _ = run(home, "index", str(shapes), "--model", "pixels")
    assert code == 0 and "added 48" in out and "failed 0" in out and "images/s" in out
    code, out, _ = run(home, "index", str(shapes), "--model", "pixels")
    assert "added 0" in out and "unchanged 48" in out

    probe = sorted((shapes / "triangle").iterdir())[0]
    grid = tmp_path / "grid.png"
    code, out, _ = run(
        home, "query", str(probe), str(shapes / "ring"), "--model", "pixels", "-k", "3", "--json", "--grid", str(grid)
    )
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 7
    first = lines[0]
    assert list(first) == ["query", "model", "ood_percentile", "warning", "results"] and first["model"] == "pixels"
    assert first["ood_percentile"] is None and first["warning"] is None  # pixels: no novelty (test_ood.py)
    assert list(first["results"][0]) == ["rank", "id", "path", "label", "distance"]
    assert first["results"][0]["path"] == str(probe) and first["results"][0]["distance"] == 0.0
    with Image.open(grid) as im:
        assert im.width > 3 * 64 and im.height > 7 * 64

    code, out, _ = run(home, "info", "--json")
    data = json.loads(out)
    assert data["images"] == 48 and data["models"][0]["vectors"] == 48 and data["disk_bytes"]["database"] > 0

    code, out, _ = run(home, "remove", str(shapes / "ring"))
    assert code == 0 and "removed 6" in out
    code, out, _ = run(home, "models")
    header, *rows = out.splitlines()
    assert code == 0 and header.split() == ["model", "kind", "input", "fit", "dim", "metric", "vectors", "index"]
    assert [row.split() for row in rows] == [["pixels", "pixels", "32x32x3", "pad", "3072", "l2", "42", "flat"]]


def test_a_query_by_id_draws_its_image_in_the_grid_and_quiet_silences_the_wrote_line(
    tmp_path: Path, home: Path, shapes: Path
) -> None:
    import numpy as np

    run(home, "index", str(shapes), "--model", "pixels")
    with Engine(home) as engine:
        image_id = engine.store.image_by_path(str(sorted((shapes / "triangle").iterdir())[0])).id
    grid = tmp_path / "grid.png"
    code, out, err = run(home, "query", f"id:{image_id}", "--model", "pixels", "-k", "3", "--grid", str(grid), "-q")
    assert code == 0 and out and err == ""  # the results on stdout, nothing for people on stderr
    with Image.open(grid) as im:
        pixels = np.asarray(im.convert("RGB"))
    placeholder = (pixels == (215, 215, 215)).all(axis=2).sum()  # an empty tile is a 96x96 block of it
    assert placeholder < 96 * 96 // 2
    code, _, err = run(home, "query", f"id:{image_id}", "--model", "pixels", "-k", "3", "--grid", str(grid))
    assert code == 0 and err.strip() == f"wrote {grid}"


def table_rows(out: str) -> list[dict[str, str]]:
    """The rows of the query command's table (one query): column name -> cell."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "distance"])
    header = lines[start].split()
    return [dict(zip(header, line.split(), strict=True)) for line in lines[start + 1 :] if line.strip()]


def test_train_pca_then_query_table(home: Path, shapes: Path) -> None:
    code, out, _ = run(home, "train", str(shapes), "--model", "pca", "--dim", "8", "--image-size", "16")
    assert code == 0 and "16x16x3 pad -> 8-d" in out
    run(home, "index", str(shapes), "--model", "pca")
    probe = sorted((shapes / "star").iterdir())[0]
    code, out, _ = run(home, "query", str(probe), "--model", "pca", "-k", "2")
    assert code == 0 and out.splitlines()[0] == f"query: {probe}"
    rows = table_rows(out)
    assert [r["rank"] for r in rows] == ["1", "2"]
    # The probe is indexed: it is its own nearest neighbour, at distance 0, with its folder's label.
    assert (rows[0]["path"], rows[0]["label"], float(rows[0]["distance"])) == (str(probe), "star", 0.0)
    assert rows[1]["path"] != str(probe) and Path(rows[1]["path"]).parent.name == rows[1]["label"]
    assert float(rows[1]["distance"]) > 0.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["query", "missing.png", "--model", "pixels"], "missing.png: no such file"),
        (["index", ".", "--model", "nope"], "unknown model 'nope'"),
        (["train", ".", "--model", "pca", "--latent-dim", "3"], "do not apply"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "embedsearch", "--home", str(tmp_path / "h"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("Error")]) == 1


def test_unreadable_database_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "bad.db"
    db.write_bytes(b"garbage" * 1000)
    proc = subprocess.run(
        [sys.executable, "-m", "embedsearch", "--db", f"sqlite:///{db}", "--home", str(tmp_path / "h"), "info"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot open the metadata database" in proc.stderr


def tree(root: Path) -> set[str]:
    """Every file and folder under ``root`` (to see that a command created nothing)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


#: Commands that read a library (or write into an existing one): none may create a library.
NEEDS_A_LIBRARY = [
    ["info"],
    ["info", "--json"],
    ["models"],
    ["query", "PROBE", "--model", "pixels"],
    ["check"],
    ["check", "--repair"],
    ["serve", "--port", "0"],
    ["remove", "PROBE"],
    ["remove", "--generated"],
    ["generate", "--model", "vae", "-n", "1"],
    ["reconstruct", "PROBE", "--model", "ae", "--out", "OUT"],
]


@pytest.mark.parametrize("where", ["home", "db-in-missing-folder", "db-missing-file"])
@pytest.mark.parametrize("args", NEEDS_A_LIBRARY, ids=" ".join)
def test_commands_on_a_missing_library_create_nothing(
    tmp_path: Path, where: str, args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12.2: a mistyped --home or --db gives one line and leaves the disk as it was."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("serve started on a missing library"))
    probe = tmp_path / "probe.png"
    Image.new("RGB", (8, 8), "red").save(probe)
    args = [str(probe) if a == "PROBE" else str(tmp_path / "out.png") if a == "OUT" else a for a in args]
    db = {"home": [], "db-in-missing-folder": ["--db", f"sqlite:///{tmp_path}/nowhere/dir/x.db"]}
    db["db-missing-file"] = ["--db", f"sqlite:///{tmp_path}/x.db"]
    before = tree(tmp_path)
    result = CliRunner().invoke(main, ["--home", str(tmp_path / "home"), *db[where], *args], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: no library at ")
    assert "create one with 'embedsearch index" in result.stderr
    assert tree(tmp_path) == before


def test_index_creates_the_library_a_read_did_not(tmp_path: Path, shapes: Path, database: str | None) -> None:
    home = tmp_path / "home"
    assert run(home, "info")[0] == 1 and not home.exists()
    code, out, _ = run(home, "index", str(shapes), "--model", "pixels")
    assert code == 0 and "added 48" in out and (home / "library.db").is_file() == (database is None)
    assert run(home, "info")[0] == 0


def test_a_database_in_a_missing_folder_is_one_line_for_a_write_too(tmp_path: Path, shapes: Path) -> None:
    url = f"sqlite:///{tmp_path}/nowhere/x.db"
    code, _, err = run(tmp_path / "home", "--db", url, "index", str(shapes), "--model", "pixels")
    assert code == 1 and err.count("\n") == 1 and "its folder does not exist" in err
    assert not (tmp_path / "nowhere").exists()


READS = [["info"], ["info", "--json"], ["models"], ["check"], ["query", "PROBE", "--model", "pixels", "-k", "2"]]
WRITES = [
    ["index", "DATA", "--model", "pixels"],
    ["remove", "PROBE"],
    ["remove", "--generated"],
    ["train", "DATA", "--model", "pca", "--name", "p2", "--dim", "4"],
    ["check", "--repair"],
]


@pytest.mark.sqlite_only  # file permissions of library.db; PostgreSQL has its own roles
def test_another_users_library_reads_and_refuses_writes_in_one_line(library_home: Path, shapes: Path) -> None:
    """Issue 12.6: chmod -R a-w (root's capabilities dropped, so that it holds in CI too): every read
    works, every write is one line; no traceback on 'library.db.migrate.lock', nothing changes."""
    from helpers import reader_command

    probe = str(sorted((shapes / "star").iterdir())[0])
    for path in [library_home, *library_home.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    before = {p: p.stat().st_mtime_ns for p in library_home.rglob("*")}
    try:
        for args in READS + WRITES:
            args = [probe if a == "PROBE" else str(shapes) if a == "DATA" else a for a in args]
            cmd = reader_command(sys.executable, "-m", "embedsearch", "--home", str(library_home), *args)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert "Traceback" not in proc.stderr, proc.stderr
            if args in READS or args[0] == "query":
                assert proc.returncode == 0 and proc.stderr == "", (args, proc.stderr)
            else:
                assert proc.returncode == 1 and proc.stderr.count("\n") == 1, (args, proc.stderr)
                assert "is read-only for this user; reading it works" in proc.stderr
        assert {p: p.stat().st_mtime_ns for p in library_home.rglob("*")} == before
    finally:
        for path in [library_home, *library_home.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


def test_tables_escape_control_characters_and_json_stays_exact(tmp_path: Path, home: Path) -> None:
    """Issue 12.6: newlines and ANSI escapes in file names were printed raw (a forged table row, a
    recoloured terminal). Tables escape them; --json gives the exact name."""
    data = tmp_path / "d"
    data.mkdir()
    names = ["evil\n    1      0.0000        9  fake  passwd.png", "red\x1b[31m.png", "\u202egnp.exe.png"]
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(data / name, format="PNG")
    raw = os.fsencode(data) + b"/\xff.png"
    Image.new("RGB", (8, 8), "blue").save(raw.decode("utf-8", "surrogateescape"), format="PNG")
    assert run(home, "index", str(data), "--model", "pixels")[0] == 0
    code, out, _ = run(home, "query", str(data), "--model", "pixels", "-k", "4")
    assert code == 0 and "\x1b" not in out and "\u202e" not in out
    assert len(out.splitlines()) == 4 * (3 + 4)  # every row is one line: "query:", "model:", header, 4 results
    assert "evil\\n    1" in out and "red\\x1b[31m.png" in out and "\\u202egnp" in out and "/\\xff.png" in out
    code, out, _ = run(home, "query", str(data), "--model", "pixels", "-k", "4", "--json")
    found = {r["path"] for line in out.splitlines() for r in json.loads(line)["results"]}
    assert found == {str(data / n) for n in names} | {os.fsdecode(raw)}
    assert "\x1b" not in out and "\\u001b" in out  # never a raw ESC: JSON's own escape, decoded exactly
    code, out, _ = run(home, "remove", os.fsdecode(raw))
    assert (code, out.strip()) == (0, "removed 1 image")


def test_one_line_errors_escape_the_names_in_them(tmp_path: Path) -> None:
    code, out, err = run(tmp_path / "h", "query", "no\nsuch\x1b[2J.png", "--model", "pixels")
    assert code == 1 and err == "Error: no\\nsuch\\x1b[2J.png: no such file or folder\n"


def test_index_into_several_models_reports_each(home: Path, shapes: Path) -> None:
    assert run(home, "index", str(shapes), "--model", "pixels")[0] == 0
    assert run(home, "train", str(shapes), "--model", "pca", "--dim", "4")[0] == 0
    code, out, _ = run(home, "index", str(shapes), "--model", "pixels,pca")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and "model 'pixels'" in lines[0] and "unchanged 48" in lines[0]
    assert "model 'pca'" in lines[1] and "added 48" in lines[1]
    code, out, _ = run(home, "index", str(shapes), "--all-models", "--json")
    assert code == 0 and [json.loads(line)["model"] for line in out.splitlines()] == ["pca", "pixels"]  # by name
    for args in ((), ("--model", "pixels", "--all-models"), ("--model", " , ")):
        code, _, err = run(home, "index", str(shapes), *args)
        assert code == 2 and "--model" in err and "Traceback" not in err


def test_fit_is_fixed_when_a_model_is_made_and_used_by_every_path(home: Path, tmp_path: Path) -> None:
    data = tmp_path / "wide"
    data.mkdir()
    for i in range(6):
        (data / f"{i}.png").write_bytes(png_bytes(noise_image(i, 16).resize((48, 16))))
    assert run(home, "index", str(data), "--model", "pixels", "--fit", "crop")[0] == 0
    assert run(home, "train", str(data), "--model", "pca", "--dim", "3", "--fit", "crop")[0] == 0
    code, out, _ = run(home, "models", "--json")
    assert code == 0 and {m["name"]: m["fit"] for m in json.loads(out)} == {"pca": "crop", "pixels": "crop"}
    with Engine(home) as engine:  # reopened: the spec comes back from the store
        assert engine.encoder("pca").spec.fit == "crop" and engine.encoder("pixels").spec.fit == "crop"
        assert (engine.encoder("pixels").spec.image_size, engine.model("pca").config["fit"]) == (48, "crop")
    code, out, _ = run(home, "query", str(data / "3.png"), "--model", "pixels", "-k", "1", "--json")
    assert code == 0 and json.loads(out)["results"][0]["distance"] == 0.0  # the query is cropped the same way
    code, _, err = run(home, "index", str(data), "--model", "pixels", "--fit", "pad")
    assert code != 0 and "--fit crop" in err and "Traceback" not in err
    for command in (("train", str(data), "--model", "pca", "--name", "p2"), ("index", str(data), "--model", "p3")):
        code, _, err = run(home, *command, "--fit", "bogus")
        errors = [line for line in err.splitlines() if line.startswith("Error")]
        assert code == 2 and errors == ["Error: Invalid value for '--fit': 'bogus' is not one of 'pad', 'crop'."]
        assert "Traceback" not in err
    with Engine(home) as engine:
        assert engine.store.model("pixels").fit == "crop" and engine.store.model("p2") is None  # type: ignore[union-attr]


def test_the_cli_offers_every_resize_policy_the_library_has() -> None:
    from embedsearch.cli.context import FITS
    from embedsearch.data.resize import FITS as LIBRARY_FITS

    assert list(LIBRARY_FITS) == FITS
