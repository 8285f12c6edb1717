from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from embedsearch.cli.main import main

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
]


def run(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--home", str(home), *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(main, [*command.split(), "-h"])
    assert result.exit_code == 0 and "Example" in result.output


def test_index_query_info_remove_end_to_end(tmp_path: Path, shapes: Path) -> None:
    home = tmp_path / "home"
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
    assert list(first) == ["query", "model", "results"] and first["model"] == "pixels"
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
    assert "pixels" in out and "42" in out


def test_train_pca_then_query_table(tmp_path: Path, shapes: Path) -> None:
    home = tmp_path / "home"
    code, out, _ = run(home, "train", str(shapes), "--model", "pca", "--dim", "8", "--image-size", "16")
    assert code == 0 and "16x16x3 -> 8-d" in out
    run(home, "index", str(shapes), "--model", "pca")
    code, out, _ = run(home, "query", str(sorted((shapes / "star").iterdir())[0]), "--model", "pca", "-k", "2")
    assert code == 0 and "rank" in out and "star" in out


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


def test_demo_runs_offline_and_writes_a_grid(tmp_path: Path) -> None:
    code, out, _ = run(tmp_path / "home", "demo", "--per-class", "4")
    assert code == 0 and "neighbours share their query's shape" in out
    assert (tmp_path / "home" / "demo" / "query-grid.png").is_file()
