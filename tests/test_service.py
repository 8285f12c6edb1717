"""The HTTP service: every route, each 4xx path, tokens, limits, concurrency and other writers.

One small library (the `trained` fixture: shapes, 28x28 grey; pixels, a tiny AE and VAE) is built once for the module;
tests that change it only make assertions that hold whatever the others added.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from embedsearch.data.synth import make_shapes
from embedsearch.engine import Engine
from embedsearch.errors import (
    DataError,
    ImageError,
    InvalidArgumentError,
    LockedError,
    ModelError,
    NotFoundError,
    StoreError,
    UnknownModelError,
)
from embedsearch.http.app import create_app
from embedsearch.http.state import Gate
from helpers import admin_sql, database_url, live_server, noise_image, png_bytes, shape_file

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def client(trained: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(trained), base_url="http://localhost") as test_client:
        yield test_client


def noise_png(seed: int, size: int = 28) -> bytes:
    return png_bytes(noise_image(seed, size, "L"))


def upload(
    client: TestClient, *files: tuple[str, bytes], headers: dict[str, str] | None = None, **form: str
) -> httpx.Response:
    return client.post("/api/images", files=[("files", f) for f in files], data=form, headers=headers)


def search_bytes(client: TestClient, data: bytes, model: str, k: int = 5) -> httpx.Response:
    return client.post("/api/search", files={"file": ("q.png", data)}, data={"model": model, "k": str(k)})


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"], body
    return body["error"]


# -- the library routes and the page ----------------------------------------------------------------


def test_health_models_stats(client: TestClient) -> None:
    assert client.get("/api/health").json()["status"] == "ok"
    models = {m["name"]: m for m in client.get("/api/models").json()["models"]}
    assert {n: m["kind"] for n, m in models.items()} == {"ae": "ae", "pixels": "pixels", "vae": "vae"}
    assert models["vae"]["dim"] == 8 and models["vae"]["vectors"] >= 48 and models["vae"]["image_size"] == 28
    stats = client.get("/api/stats").json()
    assert stats["images"] >= 48 and stats["models"] == 3 and set(stats["vectors"]) == set(models)


def test_page_static_files_and_docs(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text and "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").headers["content-type"].split(";")[0] in (
        "text/javascript",
        "application/javascript",
    )
    assert client.get("/static/style.css").status_code == 200
    for page_url, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        docs = client.get(page_url)  # served from the package: the docs work without a network
        assert docs.status_code == 200 and f"/docs-assets/{asset}" in docs.text and "cdn" not in docs.text
        assert "script-src 'self' 'unsafe-inline'" in docs.headers["content-security-policy"]
        assert client.get(f"/docs-assets/{asset}").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/api/images",
        "/api/images/{image_id}",
        "/api/images/{image_id}/file",
        "/api/search",
        "/api/generate",
        "/api/models",
        "/api/health",
        "/api/stats",
    } <= set(paths)
    assert error_of(client.get("/no/such/page"), 404)
    assert error_of(client.get("/static/%2e%2e/service.py"), 404)


# -- uploads ---------------------------------------------------------------------------------------


def test_upload_is_stored_by_hash_indexed_everywhere_and_deduplicated(client: TestClient, trained: Engine) -> None:
    data = noise_png(1)
    body = upload(client, ("../../etc/evil name.png", data), label="noise").json()
    [added] = body["images"]
    assert added["created"] and added["filename"] == "evil name.png" and body["errors"] == []
    meta = client.get(f"/api/images/{added['id']}").json()
    assert meta["models"] == ["ae", "pixels", "vae"] and meta["label"] == "noise" and meta["sha256"] == added["sha256"]
    assert meta["name"] == f"{added['sha256']}.png" and "path" not in meta
    stored = trained.home / "uploads" / added["sha256"][:2] / f"{added['sha256']}.png"
    assert stored.read_bytes() == data
    again = upload(client, ("other.png", data)).json()["images"][0]
    assert (again["id"], again["created"]) == (added["id"], False)
    for model in ("pixels", "ae", "vae"):
        top = search_bytes(client, data, model, k=1).json()["results"][0]
        assert top["id"] == added["id"] and top["distance"] == pytest.approx(0.0, abs=1e-4)


def test_upload_into_named_models_only(client: TestClient) -> None:
    [added] = upload(client, ("a.png", noise_png(2)), models=" pixels, vae ").json()["images"]
    assert client.get(f"/api/images/{added['id']}").json()["models"] == ["pixels", "vae"]


def test_several_files_one_bad_stores_the_good_ones_and_lists_the_bad(client: TestClient) -> None:
    body = upload(client, ("a.png", noise_png(3)), ("b.txt", b"hello, not an image"), ("c.png", noise_png(4))).json()
    assert [i["filename"] for i in body["images"]] == ["a.png", "c.png"]
    assert body["errors"] == [{"filename": "b.txt", "error": "b.txt: not an image (or not a supported format)"}]


def test_upload_errors_are_4xx_and_store_nothing(client: TestClient) -> None:
    before = client.get("/api/stats").json()["images"]
    assert "not an image" in error_of(upload(client, ("x.png", b"<html>not an image</html>")), 415)
    assert "empty" in error_of(upload(client, ("x.png", b"")), 422)
    truncated = noise_png(5)[:60]
    assert error_of(upload(client, ("x.png", truncated)), 422)
    assert "unknown model 'nope'" in error_of(upload(client, ("x.png", noise_png(6)), models="nope"), 404)
    assert error_of(upload(client, ("a.txt", b"x"), ("b.txt", b"y")), 415)  # every file bad
    assert "files" in error_of(client.post("/api/images", data={"label": "x"}), 422)
    assert "label" in error_of(upload(client, ("x.png", noise_png(7)), label="x" * 201), 422)
    assert client.get("/api/stats").json()["images"] == before


def test_too_many_pixels_is_refused(trained: Engine) -> None:
    big = png_bytes(Image.new("L", (400, 300)))  # 120,000 pixels, a few hundred bytes
    engine = Engine(trained.home, max_pixels=100_000)
    try:
        with TestClient(create_app(engine), base_url="http://localhost") as client:
            assert "pixels" in error_of(upload(client, ("big.png", big)), 422)
            assert "pixels" in error_of(search_bytes(client, big, "pixels"), 422)
    finally:
        engine.close()


def test_request_size_limit_by_header_and_while_streaming(trained: Engine) -> None:
    with TestClient(create_app(trained, max_upload_bytes=4096), base_url="http://localhost") as client:
        big = noise_png(8, size=64)  # about 12 KB of incompressible noise
        assert "4,096 bytes" in error_of(upload(client, ("big.png", big)), 413)
        assert error_of(search_bytes(client, big, "pixels"), 413)

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(100):
                yield b"x" * 1024

        response = client.post(
            "/api/images", content=chunks(), headers={"content-type": "multipart/form-data; boundary=abc"}
        )
        assert error_of(response, 413)
        assert upload(client, ("small.png", noise_png(9, size=8))).status_code == 200


# -- single images -----------------------------------------------------------------------------------


def test_image_metadata_and_file(client: TestClient) -> None:
    jpeg = png_bytes(noise_image(10, 24, "RGB"), "JPEG")
    [added] = upload(client, ("photo.jpeg", jpeg)).json()["images"]
    meta = client.get(f"/api/images/{added['id']}").json()
    assert (meta["format"], meta["width"], meta["height"], meta["bytes"]) == ("JPEG", 24, 24, len(jpeg))
    assert meta["url"] == f"/api/images/{added['id']}/file" and meta["generated"] is False
    file = client.get(meta["url"])
    assert file.content == jpeg and file.headers["content-type"] == "image/jpeg"
    assert file.headers["x-content-type-options"] == "nosniff"
    indexed = client.get("/api/images/1/file")  # an image indexed from a folder: its own file
    assert indexed.headers["content-type"] == "image/png" and Image.open(io.BytesIO(indexed.content)).size == (28, 28)


@pytest.mark.parametrize("path", ["/api/images/999999", "/api/images/999999/file"])
def test_unknown_image_is_404(client: TestClient, path: str) -> None:
    assert "999999" in error_of(client.get(path), 404)


def test_bad_ids_are_422(client: TestClient) -> None:
    assert "image_id" in error_of(client.get("/api/images/abc"), 422)
    assert error_of(client.get(f"/api/images/{2**70}"), 422)
    assert error_of(client.get("/api/images/-1"), 422)


def test_delete_removes_metadata_vectors_and_stored_file(client: TestClient, trained: Engine) -> None:
    data = noise_png(11)
    [added] = upload(client, ("gone.png", data)).json()["images"]
    stored = trained.home / "uploads" / added["sha256"][:2] / f"{added['sha256']}.png"
    assert stored.exists()
    assert client.delete(f"/api/images/{added['id']}").json() == {"id": added["id"], "deleted": True}
    assert not stored.exists()
    error_of(client.get(f"/api/images/{added['id']}"), 404)
    error_of(client.get("/api/search", params={"image_id": added["id"], "model": "vae"}), 404)
    for model in ("pixels", "ae", "vae"):
        assert added["id"] not in {r["id"] for r in search_bytes(client, data, model, k=50).json()["results"]}
    error_of(client.delete(f"/api/images/{added['id']}"), 404)


# -- search ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["pixels", "ae", "vae"])
def test_search_by_upload_and_by_id_agree(client: TestClient, trained_data: Path, model: str) -> None:
    by_bytes = search_bytes(client, shape_file(trained_data, "star", 2), model, k=5).json()
    assert by_bytes["model"] == model and len(by_bytes["results"]) == 5
    top = by_bytes["results"][0]
    assert top["label"] == "star" and top["distance"] == pytest.approx(0.0, abs=1e-4)
    assert [r["rank"] for r in by_bytes["results"]] == [1, 2, 3, 4, 5]
    distances = [r["distance"] for r in by_bytes["results"]]
    assert distances == sorted(distances)
    assert all(r["url"] == f"/api/images/{r['id']}/file" for r in by_bytes["results"])
    by_id = client.get("/api/search", params={"image_id": top["id"], "model": model, "k": 5}).json()
    assert by_id["results"][0]["id"] == top["id"]
    assert set(by_id["results"][0]) == {"rank", "id", "label", "distance", "url", "thumb", "name"}


def test_search_filters_by_label_and_folder(client: TestClient, trained_data: Path) -> None:
    """Issue 16.2: --label and --under in the API too, by upload and by id."""
    png = shape_file(trained_data, "star", 2)
    form = {"model": "pixels", "k": "5", "label": "ring"}
    found = client.post("/api/search", files={"file": ("q.png", png)}, data=form).json()["results"]
    assert len(found) == 5 and {r["label"] for r in found} == {"ring"}
    top = search_bytes(client, png, "pixels", k=1).json()["results"][0]
    params = {"image_id": top["id"], "model": "pixels", "k": 50, "under": str(trained_data / "circle")}
    found = client.get("/api/search", params=params).json()["results"]
    assert len(found) == 6 and {r["label"] for r in found} == {"circle"}  # the 6 files of circle/ (labels: folders)
    assert top["id"] not in {r["id"] for r in found}  # the query itself is a star: filtered out
    assert client.get("/api/search", params={**params, "under": None, "label": "no-such"}).json()["results"] == []
    bad = client.get("/api/search", params={**params, "under": "a\x00b"})
    assert 400 <= bad.status_code < 500 and "error" in bad.json()


def test_search_errors(client: TestClient, trained_data: Path) -> None:
    png = shape_file(trained_data)
    assert "unknown model 'nope'" in error_of(search_bytes(client, png, "nope"), 404)
    assert error_of(client.get("/api/search", params={"image_id": 1, "model": "nope"}), 404)
    assert error_of(client.get("/api/search", params={"image_id": 999999, "model": "vae"}), 404)
    assert error_of(search_bytes(client, b"GIF89a-but-not-really", "vae"), 415)
    assert "k" in error_of(search_bytes(client, png, "vae", k=0), 422)
    assert error_of(client.get("/api/search", params={"image_id": 1, "model": "vae", "k": 100_000}), 422)
    assert "model" in error_of(client.post("/api/search", files={"file": ("q.png", png)}), 422)
    assert "image_id" in error_of(client.get("/api/search", params={"model": "vae"}), 422)


# -- generation ---------------------------------------------------------------------------------------


def test_generate_near_an_image_with_neighbours(client: TestClient) -> None:
    body = client.post("/api/generate", json={"model": "vae", "n": 3, "seed": 4, "near": 1, "search": 2}).json()
    assert (body["model"], body["mode"], body["seed"], len(body["candidates"])) == ("vae", "near", 4, 3)
    for i, cand in enumerate(body["candidates"]):
        assert cand["index"] == i and cand["id"] is None and len(cand["latent"]) == 8
        prefix = "data:image/png;base64,"
        assert cand["image"].startswith(prefix)
        image = Image.open(io.BytesIO(base64.b64decode(cand["image"][len(prefix) :])))
        assert (image.format, image.size) == ("PNG", (28, 28))
        assert [n["rank"] for n in cand["neighbours"]] == [1, 2]
        assert cand["neighbours"][0]["url"] == f"/api/images/{cand['neighbours'][0]['id']}/file"
    again = client.post("/api/generate", json={"model": "vae", "n": 3, "seed": 4, "near": 1}).json()
    assert [c["image"] for c in again["candidates"]] == [c["image"] for c in body["candidates"]]
    assert all(c["neighbours"] == [] for c in again["candidates"])
    prior = client.post("/api/generate", json={"model": "vae", "n": 2}).json()
    assert prior["mode"] == "prior" and len(prior["candidates"]) == 2


def test_generate_errors(client: TestClient) -> None:
    assert "plain autoencoder" in error_of(client.post("/api/generate", json={"model": "ae"}), 400)
    assert "decoder" in error_of(client.post("/api/generate", json={"model": "pixels", "near": 1}), 400)
    assert error_of(client.post("/api/generate", json={"model": "nope"}), 404)
    assert error_of(client.post("/api/generate", json={"model": "vae", "near": 999999}), 404)
    assert "n" in error_of(client.post("/api/generate", json={"model": "vae", "n": 0}), 422)
    assert error_of(
        client.post("/api/generate", content=b"{not json", headers={"content-type": "application/json"}), 422
    )


# -- tokens --------------------------------------------------------------------------------------


def test_token_guards_every_write_and_leaves_reads_open(trained: Engine) -> None:
    good, wrong = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer nope"}
    with TestClient(create_app(trained, token=TOKEN), base_url="http://localhost") as client:
        for headers in (None, wrong, {"Authorization": f"Basic {TOKEN}"}):
            response = upload(client, ("t.png", noise_png(12)), headers=headers)
            assert "Bearer" in error_of(response, 401) and response.headers["www-authenticate"] == "Bearer"
        [added] = upload(client, ("t.png", noise_png(12)), headers=good).json()["images"]
        assert client.get(f"/api/images/{added['id']}").status_code == 200
        assert client.get("/api/search", params={"image_id": added["id"], "model": "vae"}).status_code == 200
        assert search_bytes(client, noise_png(12), "ae").status_code == 200
        error_of(client.delete(f"/api/images/{added['id']}"), 401)
        assert client.delete(f"/api/images/{added['id']}", headers=good).status_code == 200
        asked = {"model": "vae", "n": 2, "near": 1, "add": True}
        error_of(client.post("/api/generate", json=asked), 401)
        assert client.post("/api/generate", json={**asked, "add": False}).status_code == 200
        stored = client.post("/api/generate", json=asked, headers=good).json()["candidates"]
        assert all(isinstance(c["id"], int) for c in stored)
        meta = client.get(f"/api/images/{stored[0]['id']}").json()
        assert meta["generated"] and meta["provenance"]["mode"] == "near"


def test_token_for_reads(trained: Engine, trained_data: Path) -> None:
    with TestClient(create_app(trained, token=TOKEN, token_for_reads=True), base_url="http://localhost") as client:
        for path in ("/api/models", "/api/stats", "/api/images/1", "/api/images/1/file"):
            error_of(client.get(path), 401)
        error_of(search_bytes(client, shape_file(trained_data), "vae"), 401)
        error_of(client.post("/api/generate", json={"model": "vae"}), 401)
        assert client.get("/api/health").status_code == 200 and client.get("/").status_code == 200
        assert client.get("/api/models", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


# -- concurrency and other writers -----------------------------------------------------------------


def test_gate_lets_the_refresher_in_only_between_requests() -> None:
    gate = Gate()
    assert gate.try_enter()
    with gate.try_exclusive(0.01) as got:
        assert not got  # a request is inside: the refresher gives up ...
    assert gate.try_enter()  # ... and requests go on
    gate.leave()
    gate.leave()
    with gate.try_exclusive(0.01) as got:
        assert got and not gate.try_enter()
        with gate.try_exclusive(0.01) as again:
            assert not again  # one refresher at a time
    assert gate.try_enter()
    gate.leave()


def _hits(response: httpx.Response) -> list[tuple[int, float]]:
    assert response.status_code == 200, response.text
    return [(r["id"], r["distance"]) for r in response.json()["results"]]


@pytest.mark.slow
def test_concurrent_searches_while_uploads_are_indexed(trained: Engine, trained_data: Path) -> None:
    queries = [(shape, i) for shape in ("circle", "star", "cross") for i in (0, 3)]
    models = ("pixels", "ae", "vae")
    with live_server(create_app(trained)) as url, httpx.Client(base_url=url, timeout=60) as http:
        ids = {
            q: _hits(
                http.post(
                    "/api/search",
                    files={"file": ("q.png", shape_file(trained_data, *q))},
                    data={"model": "pixels", "k": "1"},
                )
            )[0][0]
            for q in queries
        }
        baseline = {
            (q, m): dict(_hits(http.get("/api/search", params={"image_id": ids[q], "model": m, "k": 8})))
            for q in queries
            for m in models
        }
        before = http.get("/api/stats").json()["images"]
        uploaded: list[int] = []
        failures: list[str] = []

        def uploader(seed: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as own:
                for j in range(6):
                    r = own.post("/api/images", files={"files": ("n.png", noise_png(1000 + seed * 10 + j))})
                    if r.status_code != 200:
                        failures.append(r.text)
                    else:
                        uploaded.append(r.json()["images"][0]["id"])

        def searcher(worker: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as own:
                for j in range(24):
                    q, m = queries[(worker + j) % len(queries)], models[j % len(models)]
                    if j % 2:
                        r = own.post(
                            "/api/search",
                            files={"file": ("q.png", shape_file(trained_data, *q))},
                            data={"model": m, "k": "8"},
                        )
                    else:
                        r = own.get("/api/search", params={"image_id": ids[q], "model": m, "k": 8})
                    try:
                        _check_consistent(_hits(r), ids[q], baseline[(q, m)], set(uploaded))
                    except AssertionError as exc:
                        failures.append(f"{q} {m}: {exc}")

        threads = [threading.Thread(target=uploader, args=(s,)) for s in range(2)]
        threads += [threading.Thread(target=searcher, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not failures, failures[:5]
        assert len(set(uploaded)) == 12 and http.get("/api/stats").json()["images"] == before + 12
        for seed in (0, 1):
            for model in models:
                top = _hits(
                    http.post(
                        "/api/search",
                        files={"file": ("q.png", noise_png(1000 + seed * 10 + 5))},
                        data={"model": model, "k": "1"},
                    )
                )[0]
                assert top[0] in uploaded and top[1] == pytest.approx(0.0, abs=1e-4)


def _check_consistent(
    hits: list[tuple[int, float]], query_id: int, baseline: dict[int, float], uploaded: set[int]
) -> None:
    """The query first; distances ascending; every hit a known image at its known distance or a new upload."""
    assert hits[0] == (query_id, pytest.approx(0.0, abs=1e-4)), hits[0]
    distances = [d for _, d in hits]
    assert distances == sorted(distances), distances
    for image_id, distance in hits:
        if image_id in baseline:
            assert distance == pytest.approx(baseline[image_id], rel=1e-4, abs=1e-4)
        else:
            assert image_id in uploaded or image_id > max(baseline), image_id


@pytest.mark.slow
def test_service_sees_a_cli_index_run_without_restart(client: TestClient, trained: Engine, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    make_shapes(extra, per_class=2, size=28, seed=7, mode="L")
    before = client.get("/api/stats").json()
    command = [
        sys.executable,
        "-m",
        "embedsearch",
        "--home",
        str(trained.home),
        "-q",
        "index",
        str(extra),
        "--model",
        "pixels",
        "--workers",
        "0",
    ]
    uploads = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as cli:
        while cli.poll() is None and len(uploads) < 40:  # the service writes while the CLI does
            uploads.append(upload(client, ("u.png", noise_png(2000 + len(uploads)))))
            time.sleep(0.05)
        output = cli.communicate(timeout=120)[0]
    assert cli.returncode == 0, output
    assert all(r.status_code == 200 for r in uploads)
    wanted = before["vectors"]["pixels"] + 16 + len(uploads)
    deadline = time.monotonic() + 15
    while client.get("/api/stats").json()["vectors"]["pixels"] != wanted:
        assert time.monotonic() < deadline, client.get("/api/stats").json()
        time.sleep(0.2)
    added = (extra / "ring" / "ring-0001.png").read_bytes()
    deadline = time.monotonic() + 15
    while True:  # the refresher has run once the new vectors are searchable
        top = search_bytes(client, added, "pixels", k=1).json()["results"][0]
        if top["distance"] < 1e-4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert top["distance"] == pytest.approx(0.0, abs=1e-4) and top["label"] == "ring"
    with Engine(trained.home) as fresh:  # nothing was lost or doubled on disk
        counts = fresh.store.counts()
        assert counts["images"] == before["images"] + 16 + len(uploads)
        for model in ("pixels", "ae", "vae"):
            assert len(fresh.vector_index(model)) == fresh.store.entry_stamp(fresh.model(model).id)[0]


# -- the serve command -------------------------------------------------------------------------------


def test_serve_command_builds_the_app_with_its_options(trained: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from embedsearch.cli.serve import serve

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored afterwards
    obj = {"home": str(trained.home), "db": None, "quiet": True}
    result = CliRunner().invoke(serve, [], obj=obj, env={"EMBEDSEARCH_TOKEN": "from-env"})
    assert result.exit_code == 0, result.output
    service = calls[-1]["app"].state.service
    assert (calls[-1]["host"], calls[-1]["port"]) == ("127.0.0.1", 8000)
    assert (service.token, service.token_for_reads, service.max_upload_bytes) == ("from-env", False, 20 * 2**20)
    assert os.environ["OMP_NUM_THREADS"] == "1"
    result = CliRunner().invoke(
        serve,
        ["--port", "9001", "--token", "t", "--token-for-reads", "--max-upload-mb", "1"],
        obj=obj,
        env={"EMBEDSEARCH_TOKEN": ""},
    )
    assert result.exit_code == 0, result.output
    service = calls[-1]["app"].state.service
    assert (calls[-1]["port"], service.token, service.token_for_reads, service.max_upload_bytes) == (
        9001,
        "t",
        True,
        2**20,
    )
    result = CliRunner().invoke(serve, ["--token-for-reads"], obj=obj, env={"EMBEDSEARCH_TOKEN": ""})
    assert result.exit_code == 2 and "needs --token" in result.output


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (LockedError("the library is being written by another process"), 503),
        (StoreError("database error: disk I/O error"), 503),
        (DataError("no such folder"), 400),
        (InvalidArgumentError("k must be at least 1"), 400),
        (ModelError("checkpoint is missing"), 400),
        (UnknownModelError("x", ["vae"]), 404),
        (NotFoundError("no image with id 5"), 404),
        (ImageError("a.png", "cannot decode (truncated)"), 422),
        (ImageError("a.png", "not an image (or not a supported format)"), 415),
    ],
)
def test_package_errors_map_to_statuses(
    client: TestClient, trained: Engine, monkeypatch: pytest.MonkeyPatch, error: Exception, status: int
) -> None:
    def fail(*_: Any, **__: Any) -> None:
        raise error

    monkeypatch.setattr(trained, "query_image", fail)  # what GET /api/search calls
    response = client.get("/api/search", params={"image_id": 1, "model": "vae"})
    assert error_of(response, status) == str(error)
    assert (response.headers.get("retry-after") == "5") == (status == 503)


def test_random_bytes_never_give_a_500(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    for n in (1, 8, 100, 5000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert search_bytes(client, data, "vae").status_code in (415, 422)
        assert upload(client, ("r.bin", data)).status_code in (415, 422)


def test_a_file_replaced_by_a_symlink_or_deleted_is_never_served(home: Path, shapes: Path, tmp_path: Path) -> None:
    target = sorted(shapes.rglob("*.png"))[0]
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with Engine(home) as engine:
        engine.index(str(shapes), "pixels", workers=0)
        row = engine.store.image_by_path(str(target))
        assert row is not None
        with TestClient(create_app(engine), base_url="http://localhost") as client:
            assert client.get(f"/api/images/{row.id}/file").content == target.read_bytes()
            target.unlink()
            target.symlink_to(secret)
            answer = client.get(f"/api/images/{row.id}/file")
            assert answer.status_code == 404 and "changed on disk" in answer.json()["error"]
            assert b"root:" not in answer.content and str(tmp_path) not in answer.text
            target.unlink()  # deleted between the lookup and the read: still one JSON line, no 500
            answer = client.get(f"/api/images/{row.id}/file")
            assert answer.status_code == 404 and "no longer on disk" in answer.json()["error"]


@pytest.mark.slow
def test_changes_from_another_process_show_within_seconds_under_search_load(home: Path, shapes: Path) -> None:
    with Engine(home) as engine:
        engine.index(str(shapes), "pixels", workers=0)
        some_id = engine.store.entry_image_ids(engine.model("pixels").id)[0]
        stop = threading.Event()
        errors: list[str] = []
        photo = png_bytes(noise_image(5, 1024))  # ~0.1 s a search on 2 cores: never a moment with none running

        def client(url: str, upload: bool) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                while not stop.is_set():
                    if upload:
                        files = {"file": ("q.png", photo, "image/png")}
                        answer = http.post("/api/search", data={"model": "pixels"}, files=files)
                    else:
                        answer = http.get("/api/search", params={"image_id": some_id, "model": "pixels"})
                    if answer.status_code != 200:
                        errors.append(answer.text)

        # a decode slot per uploading client: this test is about refreshes, not about shedding load (503)
        with live_server(create_app(engine, max_decodes=3)) as url, httpx.Client(base_url=url, timeout=30) as http:
            threads = [threading.Thread(target=client, args=(url, i % 2 == 0)) for i in range(6)]
            for thread in threads:
                thread.start()
            try:
                time.sleep(1.0)  # the load is on
                with Engine(home) as other:  # the CLI's process, in effect: its own lock and caches
                    new = other.add_image(png_bytes(noise_image(77, 32)), label="late").id
                deadline, seen_after = time.monotonic() + 2.0 * 3, None  # target 2 s; 3x slack for CI
                while seen_after is None and time.monotonic() < deadline:
                    answer = http.get("/api/search", params={"image_id": new, "model": "pixels", "k": 1})
                    if answer.status_code == 200 and answer.json()["results"][0]["id"] == new:
                        seen_after = time.monotonic()
                    time.sleep(0.05)
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
    assert seen_after is not None, "the new image never showed while 6 clients searched"
    assert not errors, errors[:3]


@pytest.mark.postgres
def test_the_service_sees_a_writer_with_another_home_on_its_postgresql_database(
    tmp_path: Path, shapes: Path, postgres_server: str
) -> None:
    """A PostgreSQL library shared by machines: what a writer with its own home adds shows in the
    service's searches within seconds, without a restart (the refresher reads the database)."""
    name = f"test_{os.getpid()}_{time.monotonic_ns()}"
    admin_sql(postgres_server, f'CREATE DATABASE "{name}"')
    url = database_url(postgres_server, name)
    try:
        with Engine(tmp_path / "server", db=url, create=True) as engine:
            engine.index(str(shapes), "pixels", workers=0)
            with live_server(create_app(engine)) as base, httpx.Client(base_url=base, timeout=30) as http:
                with Engine(tmp_path / "elsewhere", db=url) as other:
                    new = other.add_image(png_bytes(noise_image(77, 32)), label="late").id
                deadline, seen = time.monotonic() + 6.0, False
                while not seen and time.monotonic() < deadline:
                    answer = http.get("/api/search", params={"image_id": new, "model": "pixels", "k": 1})
                    seen = answer.status_code == 200 and answer.json()["results"][0]["id"] == new
                    time.sleep(0.05)
                assert seen, "the image added with another home never showed in the service"
    finally:
        admin_sql(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
