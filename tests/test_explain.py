"""Results explained by the decoder: reconstructions of a query and its hits, a VAE's midpoints, the
``query --explain --grid`` picture and ``/api/explain``."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from embedsearch.cli.main import main
from embedsearch.core import knn
from embedsearch.core.explain import Explanation
from embedsearch.data.images import decode_file
from embedsearch.engine import Engine
from embedsearch.errors import DataError, InvalidArgumentError, NotFoundError
from embedsearch.http.app import create_app
from embedsearch.render import grid
from embedsearch.render.grid import LINE, PAD
from embedsearch.results import QueryResult
from helpers import noise_image, png_bytes, shape_file

TILE = 96  # the grid's default tile size; 28 px pictures are drawn 3x, pixel for pixel


def image_path(data: Path, shape: str = "star", i: int = 1) -> str:
    return str(data / shape / f"{shape}-{i:04d}.png")


def stored(engine: Engine, model: str, ids: list[int]) -> np.ndarray:
    """(N, dim) the model's stored codes of ``ids``, in that order."""
    row = engine.model(model)
    found = dict(engine.store.entry_vectors(row.id, ids))
    return np.concatenate([knn.from_bytes(found[i], row.metric, row.dim) for i in ids])


def top(engine: Engine, query: str, model: str, k: int = 4) -> QueryResult:
    (result,) = engine.query([query], model, k)
    assert isinstance(result, QueryResult)
    return result


def id_of(engine: Engine, path: str) -> int:
    record = engine.store.image_by_path(str(Path(path).resolve()))
    assert record is not None
    return int(record.id)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal images, but for one grey level: a batch decodes with other float rounding than one image."""
    return a.shape == b.shape and int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= 1


# -- the service ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["ae", "vae"])
def test_hits_are_their_stored_codes_decoded_and_the_query_its_own(
    trained: Engine, trained_data: Path, model: str
) -> None:
    path = image_path(trained_data)
    result = top(trained, path, model)
    ids = [n.id for n in result.results]
    ex = trained.explain(model, path, ids)
    encoder = trained.encoder(model)
    codes = stored(trained, model, ids)  # (4, 8)
    query_code = encoder.encode(decode_file(path, encoder.spec)[1][None])  # (1, 8)
    assert ex.model == model and ex.query == path and ex.query_id is None and [h.id for h in ex.hits] == ids
    assert close(ex.reconstruction, encoder.decode(query_code)[0]) and ex.reconstruction.shape == (28, 28, 1)
    assert all(close(h.reconstruction, want) for h, want in zip(ex.hits, encoder.decode(codes), strict=True))
    if model == "vae":  # the decoded midpoint of mu_query and mu_hit
        mids = encoder.decode((query_code + codes) / 2)
        assert ex.has_midpoints and all(close(h.midpoint, m) for h, m in zip(ex.hits, mids, strict=True))
    else:  # a plain AE's space between codes means nothing: no midpoints
        assert not ex.has_midpoints and all(h.midpoint is None for h in ex.hits)


def test_what_is_decoded_is_exactly_the_stored_codes_and_their_means(
    trained: Engine, trained_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The codes handed to the decoder, not its pictures: the tiny test VAE decodes nearly everything to
    the same grey, so comparing images alone could not tell a midpoint from a hit."""
    path = image_path(trained_data, "arrow", 2)
    ids = [n.id for n in top(trained, path, "vae", k=5).results]
    encoder = trained.encoder("vae")
    calls: list[np.ndarray] = []
    real = encoder.decode
    monkeypatch.setattr(encoder, "decode", lambda z: calls.append(np.array(z)) or real(z))
    trained.explain("vae", path, ids)
    query_code = encoder.encode(decode_file(path, encoder.spec)[1][None])  # (1, 8)
    codes = stored(trained, "vae", ids)  # (5, 8)
    assert len(calls) == 2 and np.array_equal(calls[0], np.concatenate([query_code, codes]))
    assert np.array_equal(calls[1], (query_code + codes) / 2)


def test_a_query_by_id_is_its_stored_code_decoded(trained: Engine, trained_data: Path) -> None:
    image_id = id_of(trained, image_path(trained_data, "circle", 2))
    hits = [n.id for n in trained.search_image(image_id, "vae", k=3)]
    for query in (image_id, f"id:{image_id}"):
        ex = trained.explain("vae", query, hits)
        assert ex.query == f"id:{image_id}" and ex.query_id == image_id
        code = stored(trained, "vae", [image_id])
        assert close(ex.reconstruction, trained.encoder("vae").decode(code)[0])
        assert hits[0] == image_id and close(ex.hits[0].reconstruction, ex.reconstruction)  # itself first
        assert close(ex.hits[0].midpoint, ex.reconstruction)  # halfway from a code to itself: the code


def test_an_id_without_a_code_in_the_model_is_read_from_its_file(trained: Engine) -> None:
    data = png_bytes(noise_image(7, 28, "L"))  # new content, uploaded and indexed into pixels only
    added = trained.add_image(data, models=["pixels"])
    assert added.created
    try:
        assert not trained.store.entry_vectors(trained.model("vae").id, [added.id])
        ex = trained.explain("vae", added.id, [])
        assert ex.query_id == added.id and ex.path == trained.image(added.id).path
        assert close(ex.reconstruction, trained.explain("vae", data, []).reconstruction)
    finally:
        trained.delete_image(added.id)


def test_an_upload_and_no_hits(trained: Engine, trained_data: Path) -> None:
    data = shape_file(trained_data, "square", 1)
    ex = trained.explain("ae", data, [], name="q.png")
    same_file = trained.explain("ae", str(trained_data / "square" / "square-0001.png"), [])
    assert ex.query == "q.png" and ex.query_id is None and ex.hits == []
    assert np.array_equal(ex.reconstruction, same_file.reconstruction)


def test_errors_name_what_to_do(trained: Engine, trained_data: Path) -> None:
    path = image_path(trained_data)
    known = top(trained, path, "vae", k=1).results[0].id
    with pytest.raises(InvalidArgumentError, match=r"'pixels' \(pixels\) has no decoder.*kind ae or vae"):
        trained.explain("pixels", path, [known])
    with pytest.raises(NotFoundError, match="no image with id 999999"):
        trained.explain("vae", path, [known, 999999])
    with pytest.raises(NotFoundError, match="no image with id 888888"):
        trained.explain("vae", 888888, [known])
    with pytest.raises(DataError, match="no such image file"):
        trained.explain("vae", str(trained_data / "nothing.png"), [known])


# -- the CLI and its picture --------------------------------------------------------------------------


def cell(picture: Image.Image, row: int, col: int, cols: int, caption_h: int) -> np.ndarray:
    """The 84x84 picture drawn in cell (row, col) of a grid of ``cols`` columns, as (84, 84) grey."""
    title_w = picture.width - (cols * (TILE + 2 * PAD) + (cols + 1) * LINE)
    x = title_w + col * (TILE + 2 * PAD + LINE) + LINE + PAD + (TILE - 84) // 2
    y = row * (TILE + 2 * PAD + caption_h + LINE) + LINE + PAD + (TILE - 84) // 2
    return np.asarray(picture.convert("L").crop((x, y, x + 84, y + 84)))


def drawn(image: np.ndarray) -> np.ndarray:
    """(28, 28, 1) -> (84, 84): how the grid enlarges it (each pixel a 3x3 block)."""
    return np.kron(image[:, :, 0], np.ones((3, 3), dtype=np.uint8))


@pytest.mark.parametrize(("model", "rows_per_query"), [("vae", 3), ("ae", 2)])
def test_cli_explain_grid_rows_hold_the_decodings(
    trained: Engine, trained_data: Path, tmp_path: Path, model: str, rows_per_query: int
) -> None:
    path, other = image_path(trained_data), image_path(trained_data, "circle", 3)
    query_id = id_of(trained, other)
    out = tmp_path / "why.png"
    args = ["--home", str(trained.home), "query", path, f"id:{query_id}", "--model", model, "-k", "3"]
    result = CliRunner().invoke(main, [*args, "--explain", "--grid", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stderr and result.stdout.count(f"model: {model}") == 2
    caption_h = grid._line_height(grid._font())
    with Image.open(out) as picture:
        picture.load()
    rows, cols = 2 * rows_per_query, 4
    assert picture.height == rows * (TILE + 2 * PAD + caption_h) + (rows + 1) * LINE
    assert 0 < picture.width - (cols * (TILE + 2 * PAD) + (cols + 1) * LINE) <= TILE + 2 * PAD
    # The file holds what the model kept: the second query's (an id) decoded row, read back from the PNG.
    ex = trained.explain(model, f"id:{query_id}", [n.id for n in top(trained, f"id:{query_id}", model, 3).results])
    decoded_row = rows_per_query + 1
    with Image.open(other) as original:  # an id:N query is drawn as its file
        assert np.array_equal(
            cell(picture, rows_per_query, 0, cols, caption_h), drawn(np.asarray(original)[:, :, None])
        )
    assert np.array_equal(cell(picture, decoded_row, 0, cols, caption_h), drawn(ex.reconstruction))
    assert np.array_equal(cell(picture, decoded_row, 2, cols, caption_h), drawn(ex.hits[1].reconstruction))
    if model == "vae":
        assert np.array_equal(cell(picture, decoded_row + 1, 3, cols, caption_h), drawn(ex.hits[2].midpoint))
    plain = tmp_path / "plain.png"
    assert CliRunner().invoke(main, [*args, "--grid", str(plain)]).exit_code == 0
    with Image.open(plain) as without:
        assert without.height == 2 * (TILE + 2 * PAD + caption_h) + 3 * LINE  # --explain adds the rows


def test_cli_explain_errors(trained: Engine, trained_data: Path, tmp_path: Path) -> None:
    base = ["--home", str(trained.home), "query", image_path(trained_data)]
    out = tmp_path / "g.png"
    no_grid = CliRunner().invoke(main, [*base, "--model", "vae", "--explain"])
    assert no_grid.exit_code == 2 and "add --grid OUT.png" in no_grid.stderr and not no_grid.stdout
    pixels = CliRunner().invoke(main, [*base, "--model", "pixels", "--explain", "--grid", str(out)])
    assert pixels.exit_code == 1 and not pixels.stdout and not out.exists()
    assert pixels.stderr.strip().splitlines() == [
        "Error: model 'pixels' (pixels) has no decoder, so it cannot explain results; explain with a model "
        "of kind ae or vae"
    ]
    bad = CliRunner().invoke(main, [*base, "id:999999", "--model", "vae", "--explain", "--grid", str(out), "--json"])
    assert bad.exit_code == 1 and "skipped id:999999: no image with id 999999" in bad.stderr
    assert len(bad.stdout.splitlines()) == 1 and out.exists()  # the good query is still explained


# -- HTTP ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(trained: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(trained), base_url="http://localhost") as test_client:
        yield test_client


def pixels_of(url: str | None) -> np.ndarray:
    assert url is not None and url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        return np.asarray(im)[:, :, None] if im.mode == "L" else np.asarray(im)


def same_as(body: dict, ex: Explanation) -> None:
    """The JSON answer carries exactly the Explanation's pictures (PNG is lossless)."""
    assert body["model"] == ex.model and body["query"]["id"] == ex.query_id
    assert np.array_equal(pixels_of(body["query"]["reconstruction"]), ex.reconstruction)
    assert [h["id"] for h in body["hits"]] == [h.id for h in ex.hits]
    for got, want in zip(body["hits"], ex.hits, strict=True):
        assert np.array_equal(pixels_of(got["reconstruction"]), want.reconstruction)
        if want.midpoint is None:
            assert got["midpoint"] is None
        else:
            assert np.array_equal(pixels_of(got["midpoint"]), want.midpoint)


@pytest.mark.parametrize("model", ["vae", "ae"])
def test_http_explain_by_id_and_by_upload(client: TestClient, trained: Engine, trained_data: Path, model: str) -> None:
    image_id = id_of(trained, image_path(trained_data, "triangle", 1))
    hits = [n.id for n in trained.search_image(image_id, model, k=5)]
    params = {"image_id": image_id, "model": model, "hits": ",".join(map(str, hits))}
    by_id = client.get("/api/explain", params=params)
    assert by_id.status_code == 200, by_id.text
    same_as(by_id.json(), trained.explain(model, image_id, hits))
    assert (by_id.json()["hits"][0]["midpoint"] is None) == (model == "ae")
    data = shape_file(trained_data, "triangle", 1)
    form = {"model": model, "hits": params["hits"]}
    upload = client.post("/api/explain", files={"file": ("t.png", data)}, data=form)
    assert upload.status_code == 200, upload.text
    assert upload.json()["query"]["id"] is None
    same_as(upload.json(), trained.explain(model, data, hits))
    assert "/api/explain" in client.get("/openapi.json").json()["paths"]


def test_http_explain_errors(client: TestClient, trained: Engine, trained_data: Path) -> None:
    image_id = id_of(trained, image_path(trained_data, "triangle", 1))

    def error(response: object, status: int) -> str:
        assert response.status_code == status, response.text  # type: ignore[attr-defined]
        return response.json()["error"]  # type: ignore[attr-defined]

    ask = {"image_id": image_id, "model": "vae"}
    assert "no image with id 999999" in error(client.get("/api/explain", params={**ask, "hits": "999999"}), 404)
    assert "no image with id 999998" in error(client.get("/api/explain", params={**ask, "image_id": 999998}), 404)
    assert "unknown model" in error(client.get("/api/explain", params={**ask, "model": "nope"}), 404)
    pixels = error(client.get("/api/explain", params={**ask, "model": "pixels", "hits": str(image_id)}), 400)
    assert "has no decoder" in pixels and "ae or vae" in pixels
    many = ",".join([str(image_id)] * 51)
    assert "at most 50" in error(client.get("/api/explain", params={**ask, "hits": many}), 400)
    assert client.get("/api/explain", params={**ask, "hits": ",".join([str(image_id)] * 50)}).status_code == 200
    assert "whole numbers" in error(client.get("/api/explain", params={**ask, "hits": "1,x"}), 400)
    form = {"model": "pixels", "hits": str(image_id)}
    upload = client.post("/api/explain", files={"file": ("t.png", shape_file(trained_data))}, data=form)
    assert "has no decoder" in error(upload, 400)
    not_image = client.post("/api/explain", files={"file": ("t.png", b"not an image")}, data={"model": "vae"})
    assert error(not_image, 415)


def test_http_explain_is_a_read_guarded_by_token_for_reads(trained: Engine, trained_data: Path) -> None:
    image_id = id_of(trained, image_path(trained_data, "triangle", 1))
    params = {"image_id": image_id, "model": "vae", "hits": str(image_id)}
    with TestClient(create_app(trained, token="t0ken"), base_url="http://localhost") as open_reads:
        assert open_reads.get("/api/explain", params=params).status_code == 200
    with TestClient(create_app(trained, token="t0ken", token_for_reads=True), base_url="http://localhost") as closed:
        assert closed.get("/api/explain", params=params).status_code == 401
        with_token = closed.get("/api/explain", params=params, headers={"Authorization": "Bearer t0ken"})
        assert with_token.status_code == 200 and with_token.json()["hits"][0]["id"] == image_id
