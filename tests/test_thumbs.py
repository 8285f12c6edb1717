"""Thumbnails (embedsearch.core.thumbs): size and format, the cache, stored-content rules, EXIF, the HTTP route."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from embedsearch.core import thumbs
from embedsearch.engine import Engine
from embedsearch.errors import InvalidArgumentError, NotFoundError
from embedsearch.http.app import create_app
from embedsearch.render.pictures import image_tile
from helpers import photo_jpeg, png_bytes


@pytest.fixture
def photos(engine: Engine, tmp_path: Path) -> dict[str, int]:
    """Two 2000x1500 photo-like JPEGs (one turned by EXIF) and a 32x32 PNG, indexed with pixels: name -> id."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "wide.jpg").write_bytes(photo_jpeg(1))
    (folder / "turned.jpg").write_bytes(photo_jpeg(2, orientation=6))
    (folder / "small.png").write_bytes(png_bytes(Image.new("RGB", (32, 32), (9, 99, 199))))
    engine.index(str(folder), "pixels", workers=0)
    return {Path(r.path).name: r.id for r in map(engine.image, _ids(engine))}


def _ids(engine: Engine) -> list[int]:
    return [i for i, _, _ in engine.store.image_paths()]


def _picture(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_a_photo_gets_a_small_webp_of_256_px_cached_by_its_sha256(
    engine: Engine, photos: dict[str, int], pillow_decodes: list[tuple[str, tuple[int, int]]]
) -> None:
    thumb = engine.thumbnail(photos["wide.jpg"])
    picture = _picture(thumb.data)
    assert (picture.format, picture.size, thumb.media_type) == ("WEBP", (256, 192), "image/webp")
    assert len(thumb.data) < 40_000  # the original is ~730 kB
    assert thumb.sha256 == engine.image(photos["wide.jpg"]).sha256
    assert ("JPEG", (500, 375)) in pillow_decodes  # drafted to 1/4, never decoded at 2000x1500
    cached = engine.home / "thumbs" / thumb.sha256[:2] / f"{thumb.sha256}-256.webp"
    assert cached.read_bytes() == thumb.data
    assert max(_picture(engine.thumbnail(photos["wide.jpg"], 128).data).size) == 128
    with pytest.raises(InvalidArgumentError, match="128, 256, 512"):
        engine.thumbnail(photos["wide.jpg"], 100)


def test_the_second_request_is_served_from_the_cache(
    engine: Engine, photos: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = engine.thumbnail(photos["wide.jpg"])

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached thumbnail was made again")

    monkeypatch.setattr(thumbs, "shrunk_image", no_decoding)
    monkeypatch.setattr(engine.library, "image_bytes", no_decoding)  # not even the original is read
    assert engine.thumbnail(photos["wide.jpg"]) == first


def test_an_image_already_small_is_its_own_thumbnail(engine: Engine, photos: dict[str, int]) -> None:
    record = engine.image(photos["small.png"])
    thumb = engine.thumbnail(record.id)
    assert thumb.data == Path(record.path or "").read_bytes() and thumb.media_type == "image/png"
    assert not (engine.home / "thumbs").exists()  # nothing to cache


def test_a_file_changed_on_disk_gives_the_stored_content_error_not_a_thumbnail_of_it(
    engine: Engine, photos: dict[str, int]
) -> None:
    record = engine.image(photos["wide.jpg"])
    Path(record.path or "").write_bytes(photo_jpeg(7))  # other content under the indexed path
    with pytest.raises(NotFoundError, match="changed on disk since it was indexed"):
        engine.thumbnail(record.id)
    assert not (engine.home / "thumbs").exists()


def test_an_exif_turned_photo_gets_an_upright_thumbnail(engine: Engine, tmp_path: Path) -> None:
    stored = Image.new("RGB", (400, 300), (220, 0, 0))
    stored.paste((0, 0, 220), (200, 0, 400, 300))  # left half red, right half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": the stored left becomes the top
    folder = tmp_path / "turned"
    folder.mkdir()
    (folder / "turned.jpg").write_bytes(png_bytes(stored, "JPEG", quality=95, exif=exif.tobytes()))
    engine.index(str(folder), "pixels", workers=0)
    picture = _picture(engine.thumbnail(_ids(engine)[0]).data).convert("RGB")
    assert picture.size == (192, 256)  # portrait, as a viewer shows it
    top, bottom = picture.getpixel((96, 20)), picture.getpixel((96, 236))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]


def test_deleting_an_image_deletes_its_thumbnails_and_repair_removes_unused_ones(
    engine: Engine, photos: dict[str, int]
) -> None:
    wide, turned = engine.thumbnail(photos["wide.jpg"]), engine.thumbnail(photos["turned.jpg"])
    assert engine.check().ok and not engine.check().notes  # the cache is neither a problem nor a note
    engine.delete_image(photos["wide.jpg"])
    assert not (engine.home / "thumbs" / wide.sha256[:2]).exists()
    stray = engine.home / "thumbs" / "ab" / f"{'ab' * 32}-256.webp"  # e.g. of a file re-indexed with new content
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(wide.data)
    report = engine.check()
    assert report.ok and any("1 cached thumbnails" in n for n in report.notes)
    repaired = engine.check(repair=True)
    assert any("removed 1 cached thumbnails" in r for r in repaired.repaired)
    assert not stray.parent.exists()
    assert engine.thumbnail(photos["turned.jpg"]) == turned  # the one in use stays


def test_grid_tiles_decode_photos_at_a_reduced_scale(
    photos: dict[str, int], engine: Engine, pillow_decodes: list[tuple[str, tuple[int, int]]]
) -> None:
    tile = image_tile(engine.image(photos["turned.jpg"]).path, "a photo", size=96)
    assert tile.image is not None and tile.image.size == (72, 96)  # upright, fitted to the tile
    assert pillow_decodes == [("JPEG", (250, 188))]  # 1/8 scale, not 2000x1500


# -- HTTP ---------------------------------------------------------------------------------------------


@pytest.fixture
def client(engine: Engine, photos: dict[str, int]) -> Iterator[TestClient]:
    with TestClient(create_app(engine), base_url="http://localhost") as test_client:
        yield test_client


def test_thumb_route_200_etag_304_and_immutable_when_versioned(client: TestClient, photos: dict[str, int]) -> None:
    url = f"/api/images/{photos['wide.jpg']}/thumb"
    answer = client.get(url)
    sha = client.get(f"/api/images/{photos['wide.jpg']}").json()["sha256"]
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/webp"
    assert answer.headers["etag"] == f'"{sha}-256"' and answer.headers["cache-control"] == "private, no-cache"
    assert _picture(answer.content).size == (256, 192)
    again = client.get(url, headers={"If-None-Match": answer.headers["etag"]})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == answer.headers["etag"]
    assert client.get(url, headers={"If-None-Match": '"other-256"'}).status_code == 200
    versioned = client.get(url, params={"v": sha[:12], "size": 512})
    assert versioned.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert versioned.headers["etag"] == f'"{sha}-512"' and max(_picture(versioned.content).size) == 512
    assert client.get(url, params={"v": "0" * 12}).headers["cache-control"] == "private, no-cache"


def test_thumb_route_errors_are_json(client: TestClient, engine: Engine, photos: dict[str, int]) -> None:
    missing = client.get("/api/images/999999/thumb")
    assert missing.status_code == 404 and "999999" in missing.json()["error"]
    assert client.get(f"/api/images/{photos['wide.jpg']}/thumb", params={"size": 100}).status_code == 422
    Path(engine.image(photos["turned.jpg"]).path or "").write_bytes(b"other bytes")
    changed = client.get(f"/api/images/{photos['turned.jpg']}/thumb")
    assert changed.status_code == 404 and "changed on disk" in changed.json()["error"]


def test_search_hits_name_their_thumbnail(client: TestClient, photos: dict[str, int]) -> None:
    found = client.get("/api/search", params={"image_id": photos["wide.jpg"], "model": "pixels", "k": 3}).json()
    assert [r["thumb"] for r in found["results"]] == [f"/api/images/{r['id']}/thumb" for r in found["results"]]


def test_thumbs_need_the_token_when_reads_do(engine: Engine, photos: dict[str, int]) -> None:
    with TestClient(create_app(engine, token="t0ken", token_for_reads=True), base_url="http://localhost") as client:
        url = f"/api/images/{photos['wide.jpg']}/thumb"
        assert client.get(url).status_code == 401
        assert client.get(url, headers={"Authorization": "Bearer t0ken"}).status_code == 200
