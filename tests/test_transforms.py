"""The near-duplicate transforms: seeded, shape-keeping, each a real and bounded edit; mixed kept byte for byte."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from embedsearch.data.images import to_pil
from embedsearch.data.synth import make_image_array
from embedsearch.evaluation import metrics as ev
from embedsearch.evaluation import transforms as tr
from embedsearch.evaluation.transforms import TRANSFORMS

pytestmark = pytest.mark.no_store  # never opens a library

NAMES = list(TRANSFORMS)


@pytest.fixture(scope="module", params=[(28, 1), (33, 3)], ids=["grey28", "rgb33"])
def images(request: pytest.FixtureRequest) -> np.ndarray:
    """Shape pictures (grey 28 px, and RGB at an odd side) with a little texture, as a compare run gets."""
    size, channels = request.param
    x, _ = make_image_array(12, size, channels, seed=4)
    return x


def test_the_table_has_every_transform_of_the_issue() -> None:
    assert NAMES == ["crop", "shift", "rotation", "blur", "noise", "jpeg", "brightness", "mixed"]
    assert ev.augment is tr.augment is TRANSFORMS["mixed"]  # metrics keeps its name for the mixed chain


@pytest.mark.parametrize("name", NAMES)
def test_each_transform_is_seeded_keeps_shape_and_changes_every_image(name: str, images: np.ndarray) -> None:
    fn, before = TRANSFORMS[name], images.copy()
    a, b, other = fn(images, 3), fn(images, 3), fn(images, 4)
    assert a.shape == images.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)  # deterministic for a seed
    # another seed, other copies (a shift has a dozen whole-pixel offsets at this size: some may repeat)
    assert sum(not np.array_equal(x, y) for x, y in zip(a, other, strict=True)) >= len(images) // 2
    assert all(not np.array_equal(x, y) for x, y in zip(a, images, strict=True))  # every copy is an edit
    # a realistic near-duplicate: changed, but nowhere near another picture
    diff = np.abs(a.astype(int) - images.astype(int)).mean(axis=(1, 2, 3))
    assert (diff > 0.1).all() and (diff < 50).all(), diff
    # image i depends on (seed, i) only: a prefix of the batch is altered alike
    assert np.array_equal(fn(images[:3], 3), a[:3])
    assert np.array_equal(images, before)  # the input is not modified in place


def _old_alter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """metrics._alter as it was before the transforms moved out, copied verbatim to pin ``mixed``."""
    side = image.shape[0]
    frac, ux, uy, gain = rng.uniform(0.85, 0.95), rng.uniform(), rng.uniform(), rng.uniform(0.8, 1.2)
    crop = max(1, round(frac * side))
    x0, y0 = round(ux * (side - crop)), round(uy * (side - crop))
    pic = to_pil(image)
    mode = pic.mode
    pic = pic.crop((x0, y0, x0 + crop, y0 + crop)).resize((side, side), Image.Resampling.BILINEAR)
    x = np.asarray(pic, dtype=np.float32).reshape(image.shape) * gain
    x += rng.normal(0.0, 0.03 * 255.0, size=x.shape).astype(np.float32)
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    to_pil(x).save(buf, "JPEG", quality=60)
    buf.seek(0)
    with Image.open(buf) as back:
        return np.asarray(back.convert(mode), dtype=np.uint8).reshape(image.shape)


@pytest.mark.parametrize("seed", [0, 7])
def test_mixed_is_byte_identical_to_the_old_near_duplicate(seed: int, images: np.ndarray) -> None:
    old = np.stack([_old_alter(im, np.random.default_rng([seed, i])) for i, im in enumerate(images)])
    assert np.array_equal(TRANSFORMS["mixed"](images, seed), old)


def _flat_square(side: int, channels: int, background: int = 200) -> np.ndarray:
    """A uniform background with a dark square off centre: what a shift or rotation uncovers is visible."""
    x = np.full((1, side, side, channels), background, dtype=np.uint8)
    x[0, side // 4 : side // 2, side // 3 : side // 3 + side // 4] = 20
    return x


@pytest.mark.parametrize("seed", range(6))
def test_shift_translates_by_a_few_percent_and_fills_with_the_background(seed: int) -> None:
    x = _flat_square(40, 3)
    out = TRANSFORMS["shift"](x, seed)[0]
    found = [
        (dx, dy)
        for dx in range(-4, 5)
        for dy in range(-4, 5)
        if np.array_equal(np.roll(x[0], (dy, dx), axis=(0, 1)), out)  # the square stays inside: a roll is exact
    ]
    assert len(found) == 1
    dx, dy = found[0]
    assert 0.04 * 40 - 1 <= math.hypot(dx, dy) <= 0.08 * 40 + 1
    assert set(np.unique(out).tolist()) == {20, 200}  # uncovered pixels are the background, not black


@pytest.mark.parametrize("seed", range(4))
def test_rotation_turns_the_picture_and_pads_with_the_background(seed: int) -> None:
    x = _flat_square(48, 1)
    out = TRANSFORMS["rotation"](x, seed)[0]
    corners = out[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 200).all()  # the uncovered corners take the background colour
    assert (np.abs(out.astype(int) - 200) > 60).sum() == pytest.approx((x[0] < 100).sum(), rel=0.2)  # same area
    assert not np.array_equal(out, x[0])


def test_brightness_is_a_gain_of_10_to_25_percent() -> None:
    x = np.full((20, 16, 16, 3), 100, dtype=np.uint8)
    out = TRANSFORMS["brightness"](x, 0).astype(float)
    gains = out[:, 0, 0, 0] / 100.0
    assert ((np.abs(gains - 1) >= 0.1 - 0.01) & (np.abs(gains - 1) <= 0.25 + 0.01)).all()
    assert (gains > 1).any() and (gains < 1).any()  # both brighter and darker copies
    assert (out == out[:, :1, :1, :1]).all()  # one gain per image, for every pixel and channel


def test_noise_has_a_sigma_of_3_to_6_percent() -> None:
    x = np.full((10, 32, 32, 1), 128, dtype=np.uint8)
    sigma = (TRANSFORMS["noise"](x, 0).astype(float) - 128).std(axis=(1, 2, 3)) / 255
    assert ((sigma > 0.03 * 0.9) & (sigma < 0.06 * 1.1)).all()


def test_blur_smooths_and_jpeg_is_a_low_quality_re_encoding(images: np.ndarray) -> None:
    def roughness(a: np.ndarray) -> float:
        return float(np.abs(np.diff(a.astype(int), axis=1)).mean())

    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    ratio = roughness(TRANSFORMS["blur"](noise, 0)) / roughness(noise)
    assert 0.02 < ratio < 0.6  # sigma 2-4% of the side (0.56-1.12 px at 28): most pixel-to-pixel noise goes
    out = TRANSFORMS["jpeg"](images, 0)
    for image, copy in zip(images, out, strict=True):
        assert any(np.array_equal(tr._jpeg(image, q), copy) for q in range(30, 61))


def test_crop_is_a_resized_crop_of_85_to_95_percent() -> None:
    # A horizontal ramp: zoomed in by 1/frac, each pixel of the copy spans frac of a pixel, so its slope is x frac.
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (64, 1, 1))[None]
    out = TRANSFORMS["crop"](np.repeat(ramp, 8, axis=0), 1).astype(float)
    slope = (out[:, 32, 40] - out[:, 32, 24]) / 16 / (255 / 63)
    assert ((slope > 0.85 - 0.03) & (slope < 0.95 + 0.03)).all(), slope
