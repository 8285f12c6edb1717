"""Single-image operations used by the HTTP service: uploads, metadata, files, deletion, search."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedsearch.engine import Engine
from embedsearch.errors import ImageError, NotFoundError, UnknownModelError
from helpers import noise_image, png_bytes


def test_upload_is_stored_by_hash_indexed_everywhere_and_deduplicated(library: Engine) -> None:
    data = png_bytes(noise_image(11, 40))
    added = library.add_image(data, label="noise", name="../../evil name.png")
    assert added.created
    record = library.image(added.id)
    path = Path(record.path)
    assert path.name == f"{added.sha256}.png" and path.is_relative_to(library.home / "uploads")
    assert path.read_bytes() == data
    assert record.models == ["pca", "pixels"] and record.label == "noise"
    again = library.add_image(data)
    assert (again.id, again.created) == (added.id, False)
    for model in ("pixels", "pca"):
        top = library.search_bytes(data, model, k=1)[0]
        assert top.id == added.id and top.distance == pytest.approx(0.0, abs=1e-5)


def test_upload_into_named_models_only(library: Engine) -> None:
    added = library.add_image(png_bytes(noise_image(12, 32)), models=["pca"])
    assert library.image(added.id).models == ["pca"]
    with pytest.raises(UnknownModelError):
        library.add_image(png_bytes(noise_image(13, 32)), models=["nope"])


def test_not_an_image_is_refused_and_nothing_is_stored(library: Engine) -> None:
    before = library.store.counts()
    stored = sorted((library.home / "uploads").rglob("*"))
    assert len([p for p in stored if p.is_file()]) == 1  # the library's own upload
    with pytest.raises(ImageError, match="not an image"):
        library.add_image(b"<html>hello</html>", name="page.png")
    assert library.store.counts() == before
    assert sorted((library.home / "uploads").rglob("*")) == stored


def test_file_and_content_type(library: Engine) -> None:
    data = png_bytes(noise_image(14, 24), "JPEG")
    added = library.add_image(data)
    path, content_type = library.image_file(added.id)
    assert content_type == "image/jpeg" and path.read_bytes() == data


def test_served_bytes_are_exactly_the_indexed_bytes(indexed: Engine, shapes: Path, tmp_path: Path) -> None:
    # The repro: index b.png, then replace it by a symlink to a secret; it must never be served.
    target = sorted(shapes.rglob("*.png"))[0]
    row = indexed.store.image_by_path(str(target))
    assert row is not None
    original = target.read_bytes()
    assert indexed.image_bytes(row.id) == (original, "image/png")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 8)
    target.unlink()
    target.symlink_to(secret)
    with pytest.raises(NotFoundError, match="changed on disk"):
        indexed.image_bytes(row.id)
    target.unlink()
    target.write_bytes(bytes(len(original)))  # same size, other content
    with pytest.raises(NotFoundError, match="changed on disk"):
        indexed.image_bytes(row.id)
    target.unlink()
    with pytest.raises(NotFoundError, match="no longer on disk"):
        indexed.image_bytes(row.id)


def test_delete_removes_metadata_vectors_and_stored_upload(library: Engine) -> None:
    data = png_bytes(noise_image(15, 24))
    added = library.add_image(data)
    path = Path(library.image(added.id).path)
    library.delete_image(added.id)
    assert not path.exists()
    with pytest.raises(NotFoundError):
        library.image(added.id)
    assert all(n.id != added.id for n in library.search_bytes(data, "pca", k=60))
    with pytest.raises(NotFoundError):
        library.delete_image(added.id)


def test_delete_never_touches_user_files(library: Engine, shapes: Path) -> None:
    victim = sorted((shapes / "star").iterdir())[0]
    top = library.search_bytes(victim.read_bytes(), "pixels", k=1)[0]
    library.delete_image(top.id)
    assert victim.exists()


def test_search_by_image_id_uses_the_stored_vector(library: Engine, shapes: Path) -> None:
    probe = sorted((shapes / "cross").iterdir())[0]
    top = library.search_bytes(probe.read_bytes(), "pca", k=1)[0]
    hits = library.search_image(top.id, "pca", k=4)
    assert hits[0].id == top.id and len(hits) == 4
    with pytest.raises(NotFoundError, match="no image with id"):
        library.search_image(99999, "pca")


def test_generated_images_are_left_out_unless_asked(library: Engine, shapes: Path) -> None:
    probe = sorted((shapes / "ring").iterdir())[0]
    top = library.search_bytes(probe.read_bytes(), "pixels", k=1)[0]
    with library.store.session() as s:  # mark it as if a decoder had made it
        from embedsearch.core.store import Image

        s.get(Image, top.id).generated = True
    library.refresh()
    assert all(n.id != top.id for n in library.search_bytes(probe.read_bytes(), "pixels", k=48))
    assert library.search_bytes(probe.read_bytes(), "pixels", k=1, include_generated=True)[0].id == top.id
    assert library.stats()["generated"] == 1
