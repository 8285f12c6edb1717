"""The HTTP routes the page browses with: pages of images, labels, the 2-D map, and generation
between two images (embedsearch.http.library_routes and generate_routes), on the module's ``trained``
library (pixels, a tiny AE and VAE over 8 shapes x 6)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from embedsearch.engine import Engine
from embedsearch.http.app import create_app
from helpers import noise_image, png_bytes

TOKEN = "lib-token"


@pytest.fixture(scope="module")
def client(trained: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(trained), base_url="http://localhost") as test_client:
        yield test_client


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_pages_of_images_with_a_label_filter(client: TestClient) -> None:
    first = client.get("/api/images", params={"limit": 10}).json()
    assert first["total"] >= 48 and first["offset"] == 0 and len(first["images"]) == 10
    tile = first["images"][0]
    assert tile["thumb"] == f"/api/images/{tile['id']}/thumb" and tile["url"] == f"/api/images/{tile['id']}/file"
    assert tile["name"].endswith(".png") and "/" not in tile["name"]  # no server folders
    nxt = client.get("/api/images", params={"limit": 10, "offset": 10}).json()["images"]
    assert not {i["id"] for i in nxt} & {i["id"] for i in first["images"]}
    stars = client.get("/api/images", params={"label": "star"}).json()
    assert stars["total"] == 6 and {i["label"] for i in stars["images"]} == {"star"}
    for bad in ({"limit": 0}, {"limit": 201}, {"offset": -1}, {"limit": "x"}):
        assert error_of(client.get("/api/images", params=bad), 422)


def test_labels_with_counts(client: TestClient) -> None:
    labels = client.get("/api/labels").json()["labels"]
    counts = {x["label"]: x["count"] for x in labels}
    assert {s: counts[s] for s in ("circle", "star", "ring")} == {"circle": 6, "star": 6, "ring": 6}
    assert sum(counts.values()) == client.get("/api/stats").json()["images"]
    assert [x["count"] for x in labels] == sorted((x["count"] for x in labels), reverse=True)


@pytest.mark.parametrize("model", ["ae", "vae", "pixels"])
def test_the_map_of_each_model(client: TestClient, model: str) -> None:
    made = client.get("/api/map", params={"model": model}).json()
    vectors = {m["name"]: m["vectors"] for m in client.get("/api/models").json()["models"]}[model]
    assert made["model"] == model and made["method"] == "pca" and made["vectors"] == vectors
    assert len(made["points"]) == vectors and len(made["explained"]) == 2
    assert {"star", "circle"} <= {p["label"] for p in made["points"]}
    assert client.get("/api/map", params={"model": model}).json() == made  # deterministic (and cached)


def test_the_map_refuses_bad_models(client: TestClient) -> None:
    assert "nope" in error_of(client.get("/api/map", params={"model": "nope"}), 404)
    assert error_of(client.get("/api/map", params={"model": "x" * 65}), 422)
    assert error_of(client.get("/api/map"), 422)


def test_an_upload_shows_in_the_pages_labels_and_map(client: TestClient) -> None:
    before = client.get("/api/map", params={"model": "vae"}).json()["vectors"]
    files = [("files", ("n.png", png_bytes(noise_image(77, 28, "L"))))]
    added = client.post("/api/images", files=files, data={"label": "noise-77"}).json()["images"][0]
    assert {x["label"]: x["count"] for x in client.get("/api/labels").json()["labels"]}["noise-77"] == 1
    page = client.get("/api/images", params={"label": "noise-77"}).json()
    assert [i["id"] for i in page["images"]] == [added["id"]]
    made = client.get("/api/map", params={"model": "vae"}).json()
    assert made["vectors"] == before + 1 and added["id"] in {p["id"] for p in made["points"]}
    assert client.delete(f"/api/images/{added['id']}").status_code == 200
    assert client.get("/api/images", params={"label": "noise-77"}).json()["total"] == 0


def test_search_hits_name_their_files(client: TestClient) -> None:
    star = client.get("/api/images", params={"label": "star", "limit": 1}).json()["images"][0]
    hits = client.get("/api/search", params={"image_id": star["id"], "model": "ae", "k": 3}).json()["results"]
    assert hits[0]["id"] == star["id"] and hits[0]["name"] == star["name"]
    assert all(h["name"].endswith(".png") for h in hits)


@pytest.mark.parametrize("model", ["ae", "vae"])
def test_generate_between_two_images(client: TestClient, model: str) -> None:
    a, b = (
        client.get("/api/images", params={"label": s, "limit": 1}).json()["images"][0]["id"] for s in ("star", "ring")
    )
    body = {"model": model, "between": [a, b], "steps": 5, "search": 2}
    out = client.post("/api/generate", json=body).json()
    assert out["mode"] == "between" and len(out["candidates"]) == 5
    assert all(len(c["neighbours"]) == 2 and c["image"].startswith("data:image/png;base64,") for c in out["candidates"])
    ends = [out["candidates"][i]["latent"] for i in (0, -1)]
    assert ends[0] != ends[1]
    assert client.post("/api/generate", json=body).json() == out  # deterministic: no sampling


def test_generate_between_errors(client: TestClient) -> None:
    assert error_of(client.post("/api/generate", json={"model": "ae", "between": [1]}), 422)
    assert error_of(client.post("/api/generate", json={"model": "ae", "between": [1, 2, 3]}), 422)
    assert error_of(client.post("/api/generate", json={"model": "ae", "between": [1, 2], "steps": 1}), 422)
    assert "not both" in error_of(
        client.post("/api/generate", json={"model": "vae", "between": [1, 2], "near": 1}), 400
    )
    assert error_of(client.post("/api/generate", json={"model": "ae", "between": [1, 999999]}), 404)
    assert "decoder" in error_of(client.post("/api/generate", json={"model": "pixels", "between": [1, 2]}), 400)


def test_browsing_needs_the_token_when_reads_do(trained: Engine) -> None:
    with TestClient(create_app(trained, token=TOKEN, token_for_reads=True), base_url="http://localhost") as guarded:
        for path in ("/api/images", "/api/labels", "/api/map?model=ae"):
            assert error_of(guarded.get(path), 401)
            assert guarded.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
