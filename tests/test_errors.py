"""Failures of the machine, not of the input: a full disk, names too long for a file system, homes
that cannot exist. Each is one line (CLI) or one JSON error (HTTP); nothing committed is lost."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from embedsearch.engine import Engine
from embedsearch.errors import DiskFullError, InvalidArgumentError, from_os_error
from embedsearch.http.app import create_app
from helpers import fill_disk, grow_disk, noise_image, png_bytes, small_disk


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "embedsearch", "--home", str(home), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_disk_full_during_index_says_what_is_committed_and_a_rerun_finishes(
    tmp_path: Path, database: str | None
) -> None:
    """Issue 12.6: a 12 MB tmpfs as home gave a 58-line traceback in which the final save's OSError hid the
    real error. Wanted: one line naming the batches committed, exit 1; after freeing space a rerun completes.
    On PostgreSQL the database is not on that disk: every batch commits and the index file is what fails."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(400):  # 64x64x3 pixels vectors are 48 KB each: 400 of them do not fit in 12 MB
        (data / f"{i:04d}.png").write_bytes(png_bytes(noise_image(i, 64)))
    disk = tmp_path / "disk"
    with small_disk(disk, 12):
        home = disk / "home"
        line = _one_error_line(_cli(home, "index", str(data), "--model", "pixels", "--batch-size", "50"))
        if database is None:
            match = re.search(
                r"disk full while writing the database .*; everything up to batch (\d+) \((\d+) images\) is "
                r"committed; free space and run again$",
                line,
            )
            assert match, line
            committed = int(match.group(2))
            assert committed == 50 * int(match.group(1))
        else:
            assert re.match(r"Error: disk full: cannot write the index file .*; free space and run again$", line)
            committed = 400
        with Engine(home) as engine:  # what the message says is kept, is
            assert engine.stats()["images"] == committed
        grow_disk(disk, 64)
        assert "consistent" in _cli(home, "check").stdout
        rerun = _cli(home, "index", str(data), "--model", "pixels", "--batch-size", "50")
        assert rerun.returncode == 0, rerun.stderr
        assert f"added {400 - committed}," in rerun.stdout
        check = _cli(home, "check")
        assert check.returncode == 0 and "pixels: 400 entries, 400 vectors" in check.stdout, check.stdout


def test_an_upload_on_a_full_disk_is_507_and_stores_nothing(tmp_path: Path) -> None:
    """Issue 12.6: an upload on a full disk answered 500. Wanted: 507 with a JSON error; the library as before."""
    data, disk = tmp_path / "data", tmp_path / "disk"
    data.mkdir()
    (data / "a.png").write_bytes(png_bytes(noise_image(1, 32)))
    with small_disk(disk, 4), Engine(disk / "home") as engine:
        engine.index(str(data), "pixels")
        filler = fill_disk(disk)
        with TestClient(create_app(engine), base_url="http://localhost") as client:
            files = [("files", ("big.png", png_bytes(noise_image(2, 256)), "image/png"))]
            answer = client.post("/api/images", files=files)
            assert answer.status_code == 507, answer.text
            assert answer.json()["error"].startswith("disk full"), answer.text
            assert str(disk) not in answer.text  # no server paths (issue 12.5)
            assert client.get("/api/stats").json()["images"] == 1
        filler.unlink()
        assert engine.add_image(png_bytes(noise_image(2, 256)), label="after").id > 0


@pytest.mark.parametrize(
    "name, problem",
    [
        ("n" * 300, "too long"),
        ("a/b", "not a usable model name"),
        (".hidden", "not a usable model name"),
        ("", "not a usable model name"),
        ("bad\nname", "not a usable model name"),
    ],
)
def test_a_model_name_that_cannot_name_files_is_one_line(home: Path, shapes: Path, name: str, problem: str) -> None:
    """Issue 12.6: a 300-character --name gave a traceback from the file system ('File name too long')."""
    line = _one_error_line(_cli(home, "train", str(shapes), "--model", "pca", "--name", name, "--dim", "4"))
    assert problem in line, line
    with Engine(home) as engine, pytest.raises(InvalidArgumentError, match=problem):
        engine.create_model(name, "pca", str(shapes), options={"dim": 4})
    assert not (home / "models").exists() or not any((home / "models").iterdir())


@pytest.mark.parametrize("args", [["index", "DATA", "--model", "pixels"], ["info"], ["check"], ["models"]])
def test_a_home_that_cannot_exist_is_one_line(shapes: Path, args: list[str], database: str | None) -> None:
    """Issue 12.6: --home /proc/1/x gave tracebacks; writes say why the folder cannot be made, reads that
    there is no library there (on PostgreSQL: in that database, which the home does not hold)."""
    line = _one_error_line(_cli(Path("/proc/1/x"), *[str(shapes) if a == "DATA" else a for a in args]))
    where = "/proc/1/x" if database is None or args[0] == "index" else "no library at postgresql+psycopg://"
    assert where in line and ("cannot create the library folder" in line or "no library at" in line), line


def test_disk_full_errors_keep_what_they_were_doing() -> None:
    import errno

    error = from_os_error(OSError(errno.ENOSPC, "No space left on device"), "cannot write /x/y")
    assert isinstance(error, DiskFullError)
    assert str(error) == "disk full: cannot write /x/y (No space left on device); free space and run again"
    kept = error.keeping("everything up to batch 3 (30 images) is committed")
    assert str(kept) == (
        "disk full: cannot write /x/y (No space left on device); everything up to batch 3 (30 images) is committed; "
        "free space and run again"
    )


@pytest.mark.parametrize(
    "kind, options", [("pca", ["--dim", "40"]), pytest.param("ae", ["--epochs", "1"], marks=pytest.mark.slow)]
)
def test_train_on_a_full_disk_is_one_line_and_registers_nothing(
    tmp_path: Path, shapes: Path, kind: str, options: list[str], database: str | None
) -> None:
    """The same class elsewhere: safetensors reports a full disk as its own error type (a traceback)."""
    disk = tmp_path / "disk"
    train = ["train", str(shapes), "--model", kind, "--name", "m", *options]
    with small_disk(disk, 64):  # an AE of 32x32x3 writes 8 MB of weights and 25 MB of resume state
        home = disk / "home"
        assert _cli(home, "index", str(shapes), "--model", "pixels").returncode == 0
        filler = fill_disk(disk, spare=200_000)  # room to open the database, not for the weights (PCA: 480 KB)
        line = _one_error_line(_cli(home, *train))
        assert line.startswith("Error: disk full: cannot write") and line.endswith("free space and run again"), line
        models = _cli(home, "models", "--json")
        assert models.returncode == 0 and '"m"' not in models.stdout
        fill_disk(disk)  # not a byte left: even opening the database fails, and says why
        if database is None:  # (a PostgreSQL database is not on this disk)
            line = _one_error_line(_cli(home, "models"))
            assert line.startswith("Error: disk full: cannot open the metadata database"), line
        filler.unlink()
        again = _cli(home, *train)
        assert again.returncode == 0, again.stderr
