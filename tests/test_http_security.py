"""Requests from other sites: DNS rebinding (Host), cross-site writes (Origin, Sec-Fetch-Site), and
answers that never show the server's absolute paths."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from embedsearch.cli.main import main
from embedsearch.cli.serve import served_names
from embedsearch.engine import Engine
from embedsearch.http.app import create_app
from embedsearch.http.routes import image_out
from embedsearch.http.security import allowed_names, host_name, public_text
from helpers import live_server, noise_image, png_bytes, weights_file

LOCAL = "http://localhost"


@pytest.fixture
def client(indexed: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(indexed), base_url=LOCAL) as test_client:
        yield test_client


def post_image(client: TestClient, seed: int, headers: dict[str, str] | None = None) -> httpx.Response:
    files = [("files", ("x.png", png_bytes(noise_image(seed, 28)), "image/png"))]
    return client.post("/api/images", files=files, headers=headers)


def count(engine: Engine) -> int:
    return engine.stats()["images"]


# -- Host ------------------------------------------------------------------------------------------


def test_a_rebound_host_name_is_refused_and_deletes_nothing(client: TestClient, indexed: Engine) -> None:
    before = count(indexed)
    response = client.delete("/api/images/1", headers={"Host": "attacker.example"})
    assert response.status_code == 421
    assert "attacker.example" in response.json()["error"] and "--allow-host" in response.json()["error"]
    assert count(indexed) == before and indexed.image(1).id == 1
    assert client.get("/api/stats", headers={"Host": "attacker.example:8000"}).status_code == 421


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:1234", "[::1]:8000", "LOCALHOST."])
def test_loopback_names_are_answered_on_any_port(client: TestClient, host: str) -> None:
    assert client.get("/api/stats", headers={"Host": host}).status_code == 200


def test_allowed_hosts_are_answered(indexed: Engine) -> None:
    with TestClient(create_app(indexed, allowed_hosts=["photos.lan"]), base_url="http://photos.lan:8000") as client:
        assert client.get("/api/stats").status_code == 200
        assert client.get("/api/stats", headers={"Host": "other.lan"}).status_code == 421


def test_the_default_test_host_is_not_answered(indexed: Engine) -> None:
    with TestClient(create_app(indexed)) as client:  # Host: testserver
        assert client.get("/api/stats").status_code == 421


def test_serve_answers_its_host_and_allow_host_names() -> None:
    assert set(served_names("192.168.1.5", ("photos.lan",))) == {"192.168.1.5", "photos.lan"}
    import socket

    assert served_names("0.0.0.0", ()) == [socket.gethostname()]
    assert "0.0.0.0" not in allowed_names(["0.0.0.0"]) and "::1" in allowed_names([])
    assert host_name("[::1]:80") == "::1" and host_name("Example.ORG.:80") == "example.org"
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert "--allow-host" in result.output


# -- cross-site writes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://localhost:8000", "Sec-Fetch-Site": "cross-site"},
    ],
)
def test_a_cross_site_form_post_stores_nothing(client: TestClient, indexed: Engine, headers: dict[str, str]) -> None:
    before = count(indexed)
    response = post_image(client, 1, headers)
    assert response.status_code == 403 and "another web site" in response.json()["error"]
    assert count(indexed) == before


def test_a_cross_site_delete_deletes_nothing(client: TestClient, indexed: Engine) -> None:
    response = client.delete("/api/images/1", headers={"Origin": "https://evil.example"})
    assert response.status_code == 403 and indexed.image(1).id == 1


def test_cross_site_reads_are_not_writes(client: TestClient) -> None:
    assert client.get("/api/stats", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://localhost:8000", "Sec-Fetch-Site": "same-origin"},
        {"Origin": "http://127.0.0.1:8000"},
        {},  # curl, scripts
        {"Sec-Fetch-Site": "none"},  # typed into the address bar
    ],
)
def test_same_origin_and_plain_posts_work(client: TestClient, indexed: Engine, headers: dict[str, str]) -> None:
    before = count(indexed)
    response = post_image(client, 2 + len(headers), headers)
    assert response.status_code == 200, response.text
    assert count(indexed) == before + 1


def test_the_page_origin_can_write_on_a_live_server(indexed: Engine) -> None:
    with live_server(create_app(indexed)) as url, httpx.Client(base_url=url, timeout=60) as http:
        files = [("files", ("y.png", png_bytes(noise_image(9, 28)), "image/png"))]
        same = http.post("/api/images", files=files, headers={"Origin": url, "Sec-Fetch-Site": "same-origin"})
        assert same.status_code == 200, same.text
        evil = http.post("/api/images", files=files, headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403


# -- no server paths in answers --------------------------------------------------------------------


def test_a_tampered_checkpoint_error_shows_no_server_path(library_home: Path) -> None:
    weights = weights_file(library_home, "pca")
    weights.write_bytes(weights.read_bytes() + b"tampered")
    with Engine(library_home) as engine, TestClient(create_app(engine), base_url=LOCAL) as client:
        files = {"file": ("q.png", png_bytes(noise_image(3, 32, "RGB")), "image/png")}
        response = client.post("/api/search", files=files, data={"model": "pca"})
        assert response.status_code == 400 and "does not match" in response.json()["error"]
        assert str(library_home) not in response.text and "models/pca/" in response.json()["error"]
        models = client.get("/api/models")
        assert models.status_code == 200 and str(library_home) not in models.text
        assert "checkpoint" not in models.text and "weights" not in models.text


def test_image_provenance_shows_source_names_only(indexed: Engine, tmp_path: Path) -> None:
    source = tmp_path / "photos" / "cat.png"
    record = dataclasses.replace(indexed.image(1), provenance={"mode": "near", "sources": [str(source), "id:4"]})
    out = image_out(record)
    assert out["provenance"]["sources"] == ["cat.png", "id:4"] and str(tmp_path) not in str(out)


def test_public_text_keeps_the_library_terms(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert public_text(f"checkpoint {home}/models/pca/w.safetensors is missing.", home) == (
        "checkpoint models/pca/w.safetensors is missing."
    )
    assert (
        public_text(f"/srv/photos/b.png: cannot read file; see {home}", home)
        == "b.png: cannot read file; see the library"
    )
    message = public_text(f"cannot open the metadata database sqlite:///{home}/library.db: locked", home)
    assert message == "cannot open the metadata database library.db: locked"
    assert public_text("database postgresql+psycopg://u:pw@db/x down", home) == "database the postgresql database down"
    assert public_text("a/b and /api/images/3/file", Path("/nowhere")) == "a/b and /api/images/3/file"
