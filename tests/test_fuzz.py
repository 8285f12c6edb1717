"""Property-based fuzz of the decoder path: mutated image bytes either decode or raise ImageError.

Seeds are small valid PNG, JPEG, GIF, BMP, TIFF and WebP files made in code (several modes and
compressions each), plus one file of each other format Pillow opens whatever a file is called
(the scan picks files by name, Pillow by content). A case is one seed plus a short list of
mutations: bit flips, byte writes, truncation, insertion, deletion, repeats, a splice with another
seed, an integer written into a header field, a PNG IHDR field rewritten with mended CRCs (to get
past the checksums), a TIFF tag rewritten, a JPEG frame-header field rewritten. The property:
:func:`decode_bytes` returns ``(meta, array)`` with the spec's shape and dtype, or raises
:class:`ImageError` -- any other exception is a bug. Hypothesis runs derandomized (the same cases
every run) with no example database.

The mutation code is plain functions of plain data so that ``benchmarks/fuzz.py`` can drive the
same mutations from a seeded ``random.Random`` for its long run.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedsearch.data.images import InputSpec, decode_bytes
from embedsearch.data.mutations import (
    IHDR_FIELDS,
    INTERESTING,
    SOF_FIELDS,
    SPECS,
    TIFF_TAGS,
    TIFF_VALUES,
    Op,
    family,
    mutate,
    seed_corpus,
)
from embedsearch.errors import ImageError

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.no_store]


# -- the property -------------------------------------------------------------------------------


def check_decode(data: bytes, spec: InputSpec, max_pixels: int) -> bool:
    """True: decoded to a well-formed array; False: refused with ImageError. Anything else propagates."""
    try:
        meta, arr = decode_bytes(data, spec, "fuzz.img", max_pixels)
    except ImageError as exc:
        assert exc.path == "fuzz.img" and exc.reason, exc
        return False
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.shape == spec.shape, (arr.dtype, arr.shape)
    assert meta.width >= 1 and meta.height >= 1 and meta.bytes == len(data)
    assert meta.width * meta.height <= max_pixels
    return True


_pos = st.integers(0, 1 << 16) | st.integers(0, 95)  # anywhere, or in the header more often
_ops = st.one_of(
    st.tuples(st.just("flip"), _pos, st.integers(0, 7)),
    st.tuples(st.just("byte"), _pos, st.integers(0, 255)),
    st.tuples(st.just("truncate"), _pos),
    st.tuples(st.just("insert"), _pos, st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("delete"), _pos, st.integers(1, 64)),
    st.tuples(st.just("repeat"), _pos, st.integers(1, 64), st.integers(2, 4)),
    st.tuples(st.just("splice"), st.integers(0, 63), _pos, st.integers(0, 1 << 16)),
    st.tuples(
        st.just("field"),
        st.integers(0, 63),
        st.sampled_from([1, 2, 4]),
        st.booleans(),
        st.sampled_from(INTERESTING) | st.integers(0, (1 << 32) - 1),
    ),
    st.tuples(st.just("ihdr"), st.sampled_from(sorted(IHDR_FIELDS)), st.sampled_from(INTERESTING + (3, 4, 6, 10, 12))),
    st.tuples(st.just("fixcrc")),
    st.tuples(st.just("tifftag"), st.sampled_from(TIFF_TAGS), st.sampled_from(TIFF_VALUES) | st.integers(0, 0xFFFF)),
    st.tuples(st.just("sof"), st.integers(0, len(SOF_FIELDS) - 1), st.sampled_from(INTERESTING) | st.integers(0, 255)),
)

#: The test's pixel limit: low enough that a mutated size field cannot make one case take seconds.
TEST_MAX_PIXELS = 4_000_000


def test_every_seed_decodes() -> None:
    """The fuzz starts from valid files: each one decodes (otherwise the fuzz tests little)."""
    for name, data in seed_corpus():
        for spec in SPECS:
            assert check_decode(data, spec, TEST_MAX_PIXELS), name


MAIN, OTHER = family("main"), family("other")
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@settings(FUZZ, max_examples=1000)
@given(seed=st.integers(0, len(MAIN) - 1), ops=st.lists(_ops, min_size=1, max_size=4), spec=st.sampled_from(SPECS))
def test_mutated_images_decode_or_raise_image_error(seed: int, ops: list[Op], spec: InputSpec) -> None:
    """PNG, JPEG, GIF, BMP, TIFF and WebP files, mutated."""
    check_decode(mutate(MAIN, seed, ops), spec, TEST_MAX_PIXELS)


@settings(FUZZ, max_examples=150)
@given(data=st.binary(max_size=256), spec=st.sampled_from(SPECS))
def test_arbitrary_bytes_decode_or_raise_image_error(data: bytes, spec: InputSpec) -> None:
    check_decode(data, spec, TEST_MAX_PIXELS)


@settings(FUZZ, max_examples=150)
@given(magic=st.sampled_from([d[:16] for d in MAIN]), tail=st.binary(max_size=200), spec=st.sampled_from(SPECS))
def test_valid_magic_over_random_bodies_decode_or_raise_image_error(magic: bytes, tail: bytes, spec: InputSpec) -> None:
    check_decode(magic + tail, spec, TEST_MAX_PIXELS)


@settings(FUZZ, max_examples=300)
@given(seed=st.integers(0, len(OTHER) - 1), ops=st.lists(_ops, min_size=1, max_size=4), spec=st.sampled_from(SPECS))
def test_mutated_files_of_other_formats_decode_or_raise_image_error(seed: int, ops: list[Op], spec: InputSpec) -> None:
    """The other formats Pillow opens (ICO, DDS, JPEG 2000, PCX, PPM, SGI, TGA, QOI, BLP, XBM, MSP, AVIF)."""
    check_decode(mutate(OTHER, seed, ops), spec, TEST_MAX_PIXELS)
