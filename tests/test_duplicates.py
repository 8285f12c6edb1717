"""Near-duplicate groups: chunked range search against brute force, union-find, planted copies
through the Engine, exact copies, the JSON round trip, the CLI and the HTTP endpoint."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from embedsearch.cli.main import main
from embedsearch.core import duplicates as dup
from embedsearch.core import knn
from embedsearch.core.dedup import DuplicateReport
from embedsearch.data.synth import make_shapes
from embedsearch.engine import Engine
from embedsearch.errors import InvalidArgumentError
from embedsearch.http.app import create_app
from helpers import noise_image


def brute_pairs(x: np.ndarray, metric: str, threshold: float) -> set[tuple[int, int]]:
    """Every pair within ``threshold``, from the full distance matrix (fine at this size)."""
    full = 1.0 - x @ x.T if metric == "cosine" else np.sqrt(np.maximum(((x[:, None] - x[None]) ** 2).sum(-1), 0.0))
    i, j = np.nonzero(np.triu(full <= threshold, 1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def clustered(n: int = 300, dim: int = 8, seed: int = 0) -> np.ndarray:
    """Random vectors with close copies, some of them straddling chunk boundaries (chunks of 7)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    for a, b in [(6, 7), (13, 14), (0, 299), (20, 21), (21, 22), (100, 150)]:
        x[b] = x[a] + 0.02 * rng.standard_normal(dim).astype(np.float32)
    return x


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_range_search_gives_the_brute_force_pairs(metric: str, chunk: int) -> None:
    x = knn.prepare(clustered(), metric)
    index = knn.flat_index(x.shape[1], metric)
    index.add(x)
    for threshold in (0.05, 0.5, dup.calibrate(index, metric)):
        a, b, d = dup.range_pairs(index, metric, threshold, chunk=chunk)
        assert set(zip(a.tolist(), b.tolist(), strict=True)) == brute_pairs(x, metric, threshold)
        assert np.all(a < b) and np.all(d <= threshold * (1 + 2e-5) + 1e-6)
    a, b, _ = dup.range_pairs(index, metric, 0.2, chunk=chunk)
    assert {(6, 7), (13, 14), (0, 299)} <= set(zip(a.tolist(), b.tolist(), strict=True))


def test_a_dense_threshold_shrinks_the_chunks_and_keeps_every_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    x = clustered()
    index = knn.flat_index(8, "l2")
    index.add(x)
    calls: list[int] = []
    real = faiss.IndexFlat.range_search

    def counted(self: faiss.IndexFlat, queries: np.ndarray, r: float):  # type: ignore[no-untyped-def]
        calls.append(len(queries))
        return real(self, queries, r)

    monkeypatch.setattr(faiss.IndexFlat, "range_search", counted)
    monkeypatch.setattr(dup, "RESULT_BUDGET", 600)  # 2 queries' results at this threshold
    a, b, _ = dup.range_pairs(index, "l2", 4.0, chunk=64)
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == brute_pairs(x, "l2", 4.0)
    # chunks sized from the density met so far: a few queries each, not the 64 asked for
    assert max(calls) <= 8 and sum(calls) == len(x)


def test_range_search_uses_the_index_ids_and_the_query_distance_scale() -> None:
    x = clustered(300, 4)
    index = faiss.IndexIDMap2(knn.flat_index(4, "l2"))
    ids = np.arange(300, dtype=np.int64) * 10 + 1000  # not row numbers
    index.add_with_ids(x, ids)
    dist, hit = knn.search(index, x[[6]], 2, "l2")  # what a query reports: Euclidean, not squared
    a, b, d = dup.range_pairs(index, "l2", float(dist[0, 1]))  # inclusive: the pair at exactly the threshold
    assert (1060, 1070) in set(zip(a.tolist(), b.tolist(), strict=True))
    assert d[(a == 1060) & (b == 1070)][0] == pytest.approx(dist[0, 1], rel=1e-5)
    a, _, _ = dup.range_pairs(index, "l2", float(dist[0, 1]) * 0.99)
    assert 1060 not in a.tolist()


def test_union_find_matches_a_graph_search() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 400, 300), rng.integers(0, 400, 300)
    nodes, roots = dup.components(a, b)
    neighbours: dict[int, set[int]] = {}
    for u, v in zip(a.tolist(), b.tolist(), strict=True):
        neighbours.setdefault(u, set()).add(v)
        neighbours.setdefault(v, set()).add(u)
    root_of = dict(zip(nodes.tolist(), roots.tolist(), strict=True))
    assert set(root_of) == set(neighbours)
    for start in neighbours:  # every node's root is the lowest id reachable from it
        seen, todo = {start}, [start]
        while todo:
            for nxt in neighbours[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert root_of[start] == min(seen)


def test_mutual_knn_pairs() -> None:
    x = np.array([[0.0], [1.0], [1.5], [10.0], [10.2]], dtype=np.float32)
    index = knn.flat_index(1, "l2")
    index.add(x)
    a, b, _ = dup.knn_pairs(index, "l2", 1)
    # 0's nearest is 1, but 1's is 2: not mutual
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == {(1, 2), (3, 4)}
    grouping = dup.find_groups(index, "l2", k=1)
    assert [g[0].tolist() for g in grouping.groups] == [[1, 2], [3, 4]] and grouping.threshold is None


def test_ivf_copy_finds_the_close_pairs_too() -> None:
    x = clustered(3000, 8)
    index = knn.flat_index(8, "l2")
    index.add(x)
    exact = dup.find_groups(index, "l2", threshold=0.2, exact=True)
    approx = dup.find_groups(index, "l2", threshold=0.2, exact=False)
    assert approx.method == "ivf" and exact.method == "exact"
    assert [g[0].tolist() for g in approx.groups] == [g[0].tolist() for g in exact.groups]
    assert [0, 299] in [g[0].tolist() for g in exact.groups] and [20, 21, 22] in [g[0].tolist() for g in exact.groups]


def test_too_loose_a_threshold_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    index = knn.flat_index(8, "l2")
    index.add(clustered(300, 8))
    monkeypatch.setattr(dup, "MAX_PAIRS", 50)
    with pytest.raises(InvalidArgumentError, match="lower it"):
        dup.range_pairs(index, "l2", 100.0)
    with pytest.raises(InvalidArgumentError, match="0 or more"):
        dup.range_pairs(index, "l2", -1.0)
    with pytest.raises(InvalidArgumentError, match="not both"):
        dup.find_groups(index, "l2", threshold=1.0, k=2)


def test_unknown_metric_is_one_clear_error() -> None:
    with pytest.raises(InvalidArgumentError, match="does not support the metric 'manhattan'"):
        dup.radius("manhattan", 3)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_binary_codes_pair_up_by_hamming_distance_as_brute_force_does(chunk: int) -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(200, 8), dtype=np.uint8)  # 64-bit codes
    for a, b, flips in [(6, 7, 1), (13, 14, 3), (0, 199, 2), (50, 51, 0)]:
        codes[b] = codes[a]
        codes[b, : flips // 8 + 1] ^= np.uint8((1 << flips) - 1)  # ``flips`` low bits of byte 0 differ
    index = knn.id_index(64, "hamming")
    index.add_with_ids(codes, np.arange(1000, 1200, dtype=np.int64))  # ids are image ids, not rows
    bits = np.unpackbits(codes[:, None] ^ codes[None], axis=2).sum(-1)  # (N, N) Hamming, fine at this size
    for threshold in (0, 2, 3, dup.calibrate(index, "hamming")):
        a, b, d = dup.range_pairs(index, "hamming", threshold, chunk=chunk)
        i, j = np.nonzero(np.triu(bits <= threshold, 1))
        assert set(zip(a.tolist(), b.tolist(), strict=True)) == {
            (1000 + x, 1000 + y) for x, y in zip(i, j, strict=True)
        }
        assert np.array_equal(d, bits[a - 1000, b - 1000].astype(np.float32))
    grouping = dup.find_groups(index, "hamming", threshold=3)
    assert grouping.method == "exact" and grouping.pairs == 4
    assert [g[0].tolist() for g in grouping.groups] == [[1000, 1199], [1006, 1007], [1013, 1014], [1050, 1051]]
    assert [g[1].tolist() for g in grouping.groups] == [[0.0, 2.0], [0.0, 1.0], [0.0, 3.0], [0.0, 0.0]]


# -- through the Engine ------------------------------------------------------------------------------


def planted_folder(root: Path, distinct: int = 30, copies: int = 5, seed: int = 0) -> list[tuple[str, str]]:
    """``distinct`` noise pictures (seeds ``seed``, ``seed + 1`` ...), and slightly changed copies
    (pixel noise of +-3) of the first ``copies``."""
    root.mkdir(parents=True)
    pairs = []
    for i in range(distinct):
        noise_image(seed + i, 24).save(root / f"img-{i:02d}.png")
    rng = np.random.default_rng(7)
    for i in range(copies):
        arr = np.asarray(Image.open(root / f"img-{i:02d}.png"), dtype=np.int16)
        near = np.clip(arr + rng.integers(-3, 4, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(near).save(root / f"near-{i:02d}.png")
        pairs.append((str(root / f"img-{i:02d}.png"), str(root / f"near-{i:02d}.png")))
    return pairs


def path_groups(report: DuplicateReport) -> list[set[str | None]]:
    return [{im.path for im in g.images} for g in report.groups]


def test_engine_finds_planted_copies_and_no_group_for_distinct_images(engine: Engine, tmp_path: Path) -> None:
    distinct = tmp_path / "distinct"
    planted_folder(distinct, copies=0, seed=100)
    report = engine.duplicates("pixels", data=str(distinct))
    assert report.groups == [] and report.vectors == 30 and report.calibrated and report.threshold

    pairs = planted_folder(tmp_path / "planted")
    report = engine.duplicates("pixels", data=str(tmp_path / "planted"))
    found = [g for g in path_groups(report) if g & {p for pair in pairs for p in pair}]
    assert sorted(map(sorted, found)) == sorted(sorted(pair) for pair in pairs)
    assert len(report.groups) == 5 and report.pairs == 5  # the two folders' distinct images stay apart
    for group in report.groups:
        assert group.images[0].distance == 0.0 and 0 < group.images[1].distance <= report.threshold
        [hit] = [n for n in engine.search_image(group.images[0].id, "pixels", 2) if n.id == group.images[1].id]
        assert group.images[1].distance == pytest.approx(hit.distance, rel=1e-4)  # query's units


def test_a_cosine_model_groups_the_same_copies_in_its_own_units(engine: Engine, tmp_path: Path) -> None:
    pairs = planted_folder(tmp_path / "planted")
    engine.index(str(tmp_path / "planted"), "pixels", metric="cosine")
    report = engine.duplicates("pixels")
    assert report.metric == "cosine" and report.threshold is not None and report.threshold < 0.05  # 1 - cos
    assert sorted(map(sorted, path_groups(report))) == sorted(sorted(pair) for pair in pairs)
    group = report.groups[0]
    [hit] = [n for n in engine.search_image(group.images[0].id, "pixels", 2) if n.id == group.images[1].id]
    assert group.images[1].distance == pytest.approx(hit.distance, rel=1e-3, abs=1e-6)


def test_a_phash_model_finds_jpeg_copies_in_bits(engine: Engine, tmp_path: Path) -> None:
    pytest.importorskip("imagehash")
    root = tmp_path / "photos"
    make_shapes(root, per_class=4, size=32, mode="RGB")
    originals = sorted(root.rglob("*.png"))[:3]
    for path in originals:  # a re-saved copy of each: JPEG quality 70
        Image.open(path).convert("RGB").save(path.with_name(path.stem + "-copy.jpg"), quality=70)
    report = engine.duplicates("phash", data=str(root))
    assert report.metric == "hamming" and report.threshold is not None
    found = [{Path(str(im.path)).stem.removesuffix("-copy") for im in g.images} for g in report.groups]
    for path in originals:
        assert {path.stem} in found  # each copy is grouped with its original (and the two alone)
    for group in report.groups:
        assert all(float(im.distance).is_integer() for im in group.images)  # bit counts


def test_threshold_and_k_through_the_engine(engine: Engine, tmp_path: Path) -> None:
    planted_folder(tmp_path / "planted")
    report = engine.duplicates("pixels", data=str(tmp_path / "planted"))
    largest = max(g.images[1].distance for g in report.groups)
    assert len(engine.duplicates("pixels", threshold=largest).groups) == 5  # inclusive
    assert len(engine.duplicates("pixels", threshold=largest * 0.999).groups) == 4
    assert not engine.duplicates("pixels", threshold=0.0).groups
    mutual = engine.duplicates("pixels", k=1)
    assert mutual.k == 1 and mutual.threshold is None and not mutual.calibrated
    assert all(g in path_groups(mutual) for g in path_groups(report))  # each copy's nearest is its original


def test_exact_duplicate_files_form_a_group(engine: Engine, tmp_path: Path) -> None:
    data = tmp_path / "data"
    planted_folder(data, distinct=10, copies=0)
    (data / "sub").mkdir()
    shutil.copy(data / "img-03.png", data / "sub" / "again.png")
    shutil.copy(data / "img-03.png", data / "sub" / "third.png")
    report = engine.duplicates("pixels", data=str(data))
    assert report.exact_copies == 2
    [group] = report.groups
    assert {im.path for im in group.images} == {
        str(data / "img-03.png"),
        *(str(data / "sub" / n) for n in ("again.png", "third.png")),
    }
    assert {im.id for im in group.images} == {group.images[0].id} and {im.distance for im in group.images} == {0.0}


def test_report_round_trips_through_json(engine: Engine, tmp_path: Path) -> None:
    planted_folder(tmp_path / "planted")
    report = engine.duplicates("pixels", data=str(tmp_path / "planted"))
    again = DuplicateReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report and again.groups and isinstance(again.groups[0].images[0].id, int)
    assert list(report.groups[0].to_dict()) == ["group", "images"]
    assert list(report.groups[0].to_dict()["images"][0]) == ["id", "path", "distance"]


# -- the faces -------------------------------------------------------------------------------------


def run(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--home", str(home), *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_cli_json_csv_table_and_grid(home: Path, tmp_path: Path) -> None:
    pairs = planted_folder(tmp_path / "planted")
    code, out, err = run(home, "duplicates", str(tmp_path / "planted"), "--model", "pixels", "--json")
    assert code == 0 and "5 groups of 35 images" in err
    groups = [json.loads(line) for line in out.splitlines()]
    assert [g["group"] for g in groups] == [1, 2, 3, 4, 5]
    assert sorted(sorted(im["path"] for im in g["images"]) for g in groups) == sorted(sorted(p) for p in pairs)
    assert all(set(im) == {"id", "path", "distance"} for g in groups for im in g["images"])

    code, out, _ = run(home, "duplicates", "--model", "pixels", "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 10 and set(rows[0]) == {"group", "id", "path", "distance"}
    assert {r["path"] for r in rows} == {p for pair in pairs for p in pair} and float(rows[1]["distance"]) > 0

    grid = tmp_path / "dups.png"
    code, out, err = run(home, "duplicates", "--model", "pixels", "--grid", str(grid))
    assert code == 0 and len(out.splitlines()) == 5 and out.startswith("group 1: ")
    with Image.open(grid) as picture:
        assert picture.height > 5 * 96  # a row per group


def test_cli_bad_input_is_one_line(home: Path, tmp_path: Path) -> None:
    planted_folder(tmp_path / "planted", distinct=4, copies=1)
    assert run(home, "duplicates", str(tmp_path / "planted"), "--model", "pixels")[0] == 0
    for args, message in [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "pixels", "--threshold", "1", "--k", "2"], "not both"),
        (["--model", "pixels", "--threshold", "-1"], "-1"),
        (["--model", "pixels", "--json", "--csv"], "not both"),
    ]:
        result = CliRunner().invoke(main, ["--home", str(home), "duplicates", *args])
        assert result.exit_code != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_http_endpoint(engine: Engine, tmp_path: Path) -> None:
    pairs = planted_folder(tmp_path / "planted")
    engine.index(str(tmp_path / "planted"), "pixels")
    with TestClient(create_app(engine), base_url="http://localhost") as client:
        body = client.get("/api/duplicates", params={"model": "pixels"}).json()
        assert body["total_groups"] == 5 and body["calibrated"] and body["method"] == "exact"
        names = sorted(sorted(im["name"] for im in g["images"]) for g in body["groups"])
        assert names == sorted(sorted(Path(p).name for p in pair) for pair in pairs)
        first = body["groups"][0]["images"][0]
        assert first["url"] == f"/api/images/{first['id']}/file" and "path" not in first
        assert len(client.get("/api/duplicates", params={"model": "pixels", "limit": 2}).json()["groups"]) == 2
        assert client.get("/api/duplicates", params={"model": "pixels", "k": 1}).json()["k"] == 1
        for params, status in [
            ({"model": "nope"}, 404),
            ({"model": "pixels", "threshold": -1}, 422),
            ({"model": "pixels", "threshold": "x"}, 422),
            ({"model": "pixels", "threshold": 1, "k": 2}, 400),
            ({"model": "pixels", "limit": 0}, 422),
        ]:
            response = client.get("/api/duplicates", params=params)
            assert response.status_code == status and "error" in response.json()
