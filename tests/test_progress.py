"""Progress bars: only on a terminal and at INFO (not piped, not with -q); a bulk run counts failures on its bar."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from embedsearch import progress
from embedsearch.engine import Engine
from helpers import noise_image, png_bytes


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def level() -> Iterator[Callable[[int], None]]:
    """Set embedsearch's log level as the CLI does (setLevel: the logger caches its answers)."""
    logger = logging.getLogger("embedsearch")
    before = logger.level
    yield logger.setLevel
    logger.setLevel(before)


def on_terminal(monkeypatch: pytest.MonkeyPatch) -> _Terminal:
    """stderr becomes a terminal. Called in the test body: pytest's capturing resets sys.stderr after fixtures."""
    out = _Terminal()
    monkeypatch.setattr(sys, "stderr", out)
    return out


@pytest.mark.parametrize("at, shown", [(logging.INFO, True), (logging.DEBUG, True), (logging.ERROR, False)])
def test_bars_follow_the_terminal_and_the_log_level(
    monkeypatch: pytest.MonkeyPatch, level: Callable[[int], None], at: int, shown: bool
) -> None:
    terminal = on_terminal(monkeypatch)
    level(at)
    assert progress.wanted() is shown
    monkeypatch.setattr(terminal, "isatty", lambda: False)  # piped
    assert not progress.wanted()


def test_training_and_its_decoding_show_bars_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, level: Callable[[int], None], shapes: Path, tmp_path: Path
) -> None:
    terminal = on_terminal(monkeypatch)
    level(logging.INFO)
    with Engine(tmp_path / "home") as engine:
        engine.create_model("ae", "ae", str(shapes), options={"epochs": 2, "latent_dim": 4, "augment": []})
    text = terminal.getvalue()
    assert "decoding" in text and "/48 " in text
    assert "epoch 1/2" in text and "epoch 2/2" in text


def test_a_bulk_run_counts_failures_and_duplicates_on_its_bar(
    monkeypatch: pytest.MonkeyPatch, shapes: Path, tmp_path: Path
) -> None:
    from tqdm import tqdm

    from embedsearch.core import bulk

    terminal = on_terminal(monkeypatch)
    # Every update drawn (tqdm draws at most every 0.1 s by default: the run takes less).
    monkeypatch.setattr(bulk, "bar", lambda total, desc, enabled: tqdm(total=total, file=terminal, mininterval=0))
    (shapes / "broken.png").write_bytes(b"not an image")
    (shapes / "copy.png").write_bytes(sorted(shapes.glob("*/*.png"))[0].read_bytes())
    with Engine(tmp_path / "home") as engine:
        report = engine.index(str(shapes), "pixels", progress=True)
    assert len(report.failed) == 1 and report.duplicates == 1
    assert "failed=1" in terminal.getvalue() and "duplicates=1" in terminal.getvalue()


def test_no_bar_when_piped(shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (shapes / "one.png").write_bytes(png_bytes(noise_image(3)))
    with Engine(tmp_path / "home") as engine:
        engine.create_model("pca", "pca", str(shapes), options={"dim": 4})
    assert "decoding" not in capsys.readouterr().err
