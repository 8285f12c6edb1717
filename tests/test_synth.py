from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedsearch.data.synth import SHAPES, make_image_array, make_shapes, shape_image
from embedsearch.errors import InvalidArgumentError

pytestmark = pytest.mark.no_store  # never opens a library


def _bytes(paths: list[Path], root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in paths}


@pytest.mark.parametrize("seed", range(6))
def test_each_class_draws_its_own_outline(seed: int) -> None:
    """From the same generator state every class draws the same background, colour, size, place and
    turn (those are drawn first); what is left to tell them apart is the outline. Every pair of
    classes must differ on a good share of the pixels, and each picture is a pure function of the seed."""
    size = 32
    drawn = {s: np.asarray(shape_image(s, np.random.default_rng(seed), size, "L"), np.int16) for s in SHAPES}
    assert len(drawn) >= 6  # enough classes for retrieval to be worth measuring
    for i, a in enumerate(SHAPES):
        again = np.asarray(shape_image(a, np.random.default_rng(seed), size, "L"), np.int16)
        assert np.array_equal(drawn[a], again)  # the same seed draws the same picture
        other_seed = np.asarray(shape_image(a, np.random.default_rng(seed + 100), size, "L"), np.int16)
        assert not np.array_equal(drawn[a], other_seed)  # another seed draws another one
        for b in SHAPES[i + 1 :]:
            # Shape and background differ by >= 70 grey levels: count the pixels where one picture
            # has the shape and the other the background (more than half that contrast apart).
            differing = np.mean(np.abs(drawn[a] - drawn[b]) > 35)
            assert differing >= 0.02, (a, b, differing)


def test_layout_count_and_sorting(tmp_path: Path) -> None:
    paths = make_shapes(tmp_path, per_class=3, size=32)
    assert len(paths) == 3 * len(SHAPES)
    assert paths == sorted(paths)
    assert sorted(d.name for d in tmp_path.iterdir()) == sorted(SHAPES)
    for shape in SHAPES:
        names = sorted(p.name for p in (tmp_path / shape).iterdir())
        assert names == [f"{shape}-{i:04d}.png" for i in range(3)]
    assert set(paths) == {p for p in tmp_path.rglob("*.png")}


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_files_decode_with_size_and_mode(tmp_path: Path, mode: str) -> None:
    for path in make_shapes(tmp_path, per_class=2, size=40, mode=mode):
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.size == (40, 40)
            assert img.mode == mode


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    first = _bytes(make_shapes(a, per_class=4, seed=7), a)
    assert first == _bytes(make_shapes(b, per_class=4, seed=7), b)
    other = _bytes(make_shapes(c, per_class=4, seed=8), c)
    assert other.keys() == first.keys()
    assert all(other[k] != first[k] for k in first)


def test_smaller_set_is_prefix_of_larger(tmp_path: Path) -> None:
    small = _bytes(make_shapes(tmp_path / "s", per_class=2, seed=3), tmp_path / "s")
    large = _bytes(make_shapes(tmp_path / "l", per_class=5, seed=3), tmp_path / "l")
    assert all(large[k] == v for k, v in small.items())


def test_jpeg_output(tmp_path: Path) -> None:
    paths = make_shapes(tmp_path, per_class=1, size=32, fmt="jpg")
    assert all(p.suffix == ".jpg" for p in paths)
    with Image.open(paths[0]) as img:
        assert img.format == "JPEG" and img.size == (32, 32)


def test_shape_is_visible_and_images_vary() -> None:
    imgs = [np.asarray(shape_image(s, np.random.default_rng(i), 48)) for i, s in enumerate(SHAPES)]
    for arr in imgs:
        assert arr.shape == (48, 48, 3) and arr.dtype == np.uint8
        grey = np.asarray(Image.fromarray(arr).convert("L"), dtype=np.int32)
        # Shape vs background contrast survives greyscale conversion.
        assert np.percentile(grey, 98) - np.percentile(grey, 2) >= 50
    assert len({a.tobytes() for a in imgs}) == len(imgs)


def test_colour_does_not_give_away_the_class() -> None:
    # Mean colours of two classes overlap heavily: neither is systematically brighter/redder.
    images, labels = make_image_array(400, 32, 3, seed=0)
    means = images.reshape(len(images), -1, 3).mean(axis=1)
    a, b = means[labels == 0], means[labels == 1]
    assert np.all(np.abs(a.mean(axis=0) - b.mean(axis=0)) < 30)


def test_grey_shape_image() -> None:
    img = shape_image("star", np.random.default_rng(0), size=28, mode="L")
    assert img.mode == "L" and img.size == (28, 28)


@pytest.mark.parametrize("channels", [1, 3])
def test_make_image_array(channels: int) -> None:
    n = 3 * len(SHAPES) + 2
    images, labels = make_image_array(n, 24, channels, seed=1)
    assert images.shape == (n, 24, 24, channels) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    counts = np.bincount(labels, minlength=len(SHAPES))
    assert counts.min() >= 3 and counts.max() <= 4 and counts.sum() == n
    again, again_labels = make_image_array(n, 24, channels, seed=1)
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    other, _ = make_image_array(n, 24, channels, seed=2)
    assert not np.array_equal(images, other)


def test_array_matches_files(tmp_path: Path) -> None:
    images, labels = make_image_array(len(SHAPES), 32, 3, seed=5)
    make_shapes(tmp_path, per_class=1, size=32, seed=5)
    for img, label in zip(images, labels, strict=False):
        shape = SHAPES[label]
        with Image.open(tmp_path / shape / f"{shape}-0000.png") as f:
            assert np.array_equal(np.asarray(f), img)


def test_empty_array() -> None:
    images, labels = make_image_array(0, 16, 1, seed=0)
    assert images.shape == (0, 16, 16, 1) and labels.shape == (0,)


@pytest.mark.parametrize(
    "call",
    [
        lambda tmp: shape_image("hexagon", np.random.default_rng(0)),
        lambda tmp: shape_image("circle", np.random.default_rng(0), mode="CMYK"),
        lambda tmp: shape_image("circle", np.random.default_rng(0), size=2),
        lambda tmp: make_shapes(tmp, fmt="nope"),
        lambda tmp: make_shapes(tmp, per_class=0),
        lambda tmp: make_image_array(4, 16, 2, seed=0),
        lambda tmp: make_image_array(-1, 16, 1, seed=0),
    ],
)
def test_invalid_arguments(tmp_path: Path, call) -> None:
    with pytest.raises(InvalidArgumentError):
        call(tmp_path)
