"""The demo: four models on synthetic shapes, one picture naming them, precision computed from the engine."""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from embedsearch.cli.main import main
from embedsearch.data.synth import SHAPES, make_shapes
from embedsearch.demo import AE, MODELS, PICTURE, VAE, DemoConfig, DemoOutcome, run_demo, score
from embedsearch.engine import Engine
from embedsearch.render.grid import render_grid
from embedsearch.results import Neighbour, QueryResult

#: A demo small enough for a test: 3 pictures of each shape at 16 px, one epoch of training.
SMALL = DemoConfig(per_class=3, epochs=1, batch_size=8, size=16, k=2, queries=2, samples=3, tile_size=32)


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory, module_database: str | None) -> Path:
    return tmp_path_factory.mktemp("demo") / "home"


@pytest.fixture(scope="module")
def demo(demo_home: Path, module_database: str | None) -> Iterator[tuple[Engine, DemoOutcome]]:
    with Engine(demo_home, db=module_database) as eng:
        yield eng, run_demo(eng, SMALL)


def neighbours_of_every_image(engine: Engine, data: Path, model: str, k: int) -> dict[str, list[Neighbour]]:
    """Each demo image's k nearest others, asked of the engine afresh (the test's own recomputation)."""
    files = sorted(str(p) for p in data.rglob("*.png"))
    out = {}
    for result in engine.query(files, model, k=k + 1):
        assert isinstance(result, QueryResult)
        out[result.query] = [n for n in result.results if n.path != result.query][:k]
    return out


@pytest.mark.slow
def test_the_picture_has_a_row_per_model_per_query_naming_it(demo: tuple[Engine, DemoOutcome]) -> None:
    _, outcome = demo
    picture, k = outcome.picture, SMALL.k
    assert len(outcome.shown) == SMALL.queries
    assert len({Path(q).parent.name for q in outcome.shown}) == SMALL.queries  # different shapes
    block = len(MODELS) * SMALL.queries
    assert picture.titles[:block] == list(MODELS) * SMALL.queries
    for row, (title, tiles) in enumerate(zip(picture.titles[:block], picture.rows[:block], strict=True)):
        query = outcome.shown[row // len(MODELS)]
        assert tiles[0].caption == f"query: {Path(query).parent.name}"
        assert tiles[0].image is not None
        # The hits are the model's own results, captioned with their label and distance.
        (found,) = [r for r in outcome.results[title] if r.query == query]
        hits = [n for n in found.results if n.path != query][:k]
        assert [t.caption for t in tiles[1:]] == [f"{n.label} {n.distance:.3f}" for n in hits]
        assert len(tiles) == k + 1
    # Then the reconstructions of both decoders and the VAE's samples, each row naming its model.
    assert picture.titles[block:] == ["original", f"{AE} recon", f"{VAE} recon", f"{VAE} prior"]
    assert [len(r) for r in picture.rows[block:]] == [SMALL.queries, SMALL.queries, SMALL.queries, SMALL.samples]
    assert all(t.image is not None for r in picture.rows[block:] for t in r)
    # The file is exactly these rows drawn.
    assert picture.path.name == PICTURE
    with Image.open(picture.path) as im:
        drawn = np.asarray(im.convert("RGB"))
    expected = np.asarray(render_grid(picture.rows, SMALL.tile_size, picture.titles))
    assert np.array_equal(drawn, expected)


@pytest.mark.slow
def test_the_precision_lines_are_the_engines_results_counted(demo: tuple[Engine, DemoOutcome]) -> None:
    engine, outcome = demo
    k, n = SMALL.k, SMALL.per_class * len(SHAPES)
    counted = {}
    for model in MODELS:
        found = neighbours_of_every_image(engine, outcome.data, model, k)
        assert len(found) == n
        counted[model] = sum(nb.label == Path(q).parent.name for q, hits in found.items() for nb in hits)
    assert {s.model: s.hits for s in outcome.scores} == counted
    assert all(s.total == n * k for s in outcome.scores)
    for s in outcome.scores:
        line = f"precision@{k} {s.model:<11} {counted[s.model] / (n * k):.3f}  ({counted[s.model]}/{n * k} "
        assert any(out.startswith(line) for out in outcome.lines), line
    best = max(counted.values())
    won = [m for m in MODELS if counted[m] == best]
    assert outcome.winners == won
    verdict = f"winner: {won[0]}" if len(won) == 1 else f"tie between {', '.join(won)}"
    assert any(line.startswith(verdict + f" (precision@{k} {best / (n * k):.3f}") for line in outcome.lines)
    assert outcome.chance == pytest.approx((SMALL.per_class - 1) / (n - 1))


@pytest.mark.slow
def test_a_second_run_reuses_everything_and_other_settings_start_afresh(demo: tuple[Engine, DemoOutcome]) -> None:
    engine, first = demo
    again = run_demo(engine, SMALL)
    assert [r.added for r in again.indexed] == [0] * len(MODELS)
    assert again.scores == first.scores and again.picture.titles == first.picture.titles
    bigger = dataclasses.replace(SMALL, per_class=SMALL.per_class + 1)
    fresh = run_demo(engine, bigger)
    n = bigger.per_class * len(SHAPES)
    assert [(r.scanned, r.added) for r in fresh.indexed] == [(n, n)] * len(MODELS)
    assert engine.stats()["images"] == n  # the earlier pictures are gone from the library
    assert all(s.total == n * bigger.k for s in fresh.scores)


@pytest.mark.slow
def test_what_an_older_demo_left_is_cleared_away(engine: Engine) -> None:
    """Before issue 16 the demo put its shapes in the library's 'pixels' and an 8-class 'pca-demo'."""
    root = engine.home / "demo"
    make_shapes(root / "shapes", per_class=2, size=16, seed=5)
    engine.index(str(root / "shapes"), "pixels")
    engine.create_model("pca-demo", "pca", str(root / "shapes"), options={"dim": 4})
    (root / "query-grid.png").write_bytes(b"the old picture")
    outcome = run_demo(engine, SMALL)
    n = SMALL.per_class * len(SHAPES)
    vectors = {m.name: (m.vectors, m.dim) for m in engine.models()}
    assert vectors["pixels"][0] == 0 and vectors["pca-demo"] == (n, SMALL.pca_dim)
    assert engine.stats()["images"] == n and all(s.total == n * SMALL.k for s in outcome.scores)
    assert not (root / "query-grid.png").exists()


def result(query: str, found: list[tuple[str, str]]) -> QueryResult:
    """A query's results: (path, label) pairs, best first; an image's id is derived from its path."""
    hits = [
        Neighbour(rank, zlib.crc32(path.encode()), path, label, float(rank))
        for rank, (path, label) in enumerate(found, 1)
    ]
    return QueryResult(query, "m", hits)


@pytest.mark.no_store
def test_score_leaves_the_query_out_wherever_it_ranks(tmp_path: Path) -> None:
    circle = str(tmp_path / "circle" / "circle-0000.png")
    results = [
        # A tie put another picture before the query itself: the query is still dropped.
        result(
            circle, [(str(tmp_path / "circle/circle-0001.png"), "circle"), (circle, "circle"), ("/x/s.png", "square")]
        ),
        # Fewer results than k: the missing one counts as a miss.
        result(str(tmp_path / "square" / "square-0000.png"), [(str(tmp_path / "square/square-0002.png"), "square")]),
    ]
    s = score("m", results, 2)
    assert (s.hits, s.total, s.precision) == (2, 4, 0.5)


SCORE_LINE = re.compile(
    r"^precision@5 (\S+) +(\d\.\d{3})  \((\d+)/(\d+) nearest neighbours share their query's shape\)$"
)


@pytest.mark.slow
def test_demo_command_prints_a_precision_line_per_model_and_the_winner(home: Path) -> None:
    args = ["--home", str(home), "demo", "--per-class", "3", "--epochs", "1"]
    out = CliRunner().invoke(main, args, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    scores = [m.groups() for m in map(SCORE_LINE.match, lines) if m]
    assert [s[0] for s in scores] == list(MODELS)
    n = 3 * len(SHAPES)
    assert all(int(total) == 5 * n and f"{int(hits) / (5 * n):.3f}" == p for _, p, hits, total in scores)
    best = max(int(s[2]) for s in scores)
    won = [s[0] for s in scores if int(s[2]) == best]
    assert any(line.startswith(f"winner: {won[0]} " if len(won) == 1 else "tie between") for line in lines)
    (picture,) = [line.removeprefix("picture: ").rsplit(" (", 1)[0] for line in lines if line.startswith("picture: ")]
    assert Path(picture) == home / "demo" / PICTURE and Path(picture).is_file()
