"""Decoding many files: in order, in worker processes, with a bounded amount decoded ahead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedsearch.data import ingest
from embedsearch.data.images import FileInfo, InputSpec, scan
from helpers import noise_image, png_bytes

pytestmark = pytest.mark.no_store  # never opens a library

SPEC = InputSpec(16, 3)


def folder(root: Path, count: int, bad: tuple[int, ...] = ()) -> list:
    root.mkdir()
    for i in range(count):
        data = b"not an image" if i in bad else png_bytes(noise_image(i))
        (root / f"{i:04d}.png").write_bytes(data)
    return sorted(scan(root), key=lambda f: f.path)


def test_pool_decodes_every_file_in_order_like_the_serial_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = folder(tmp_path / "data", 60, bad=(7, 33))
    monkeypatch.setattr(ingest, "POOL_THRESHOLD", 10)
    monkeypatch.setattr(ingest, "CHUNK", 4)
    monkeypatch.setattr(ingest, "AHEAD", 3)
    assert ingest.uses_pool(files, workers=2) and not ingest.uses_pool(files, workers=1)
    pooled = list(ingest.decode_all(files, SPEC, workers=2))
    serial = list(ingest.decode_all(files, SPEC, workers=1))
    assert [d.file.path for d in pooled] == [f.path for f in files] == [d.file.path for d in serial]
    assert [i for i, d in enumerate(pooled) if d.error] == [7, 33]
    for a, b in zip(pooled, serial, strict=False):
        assert a.error == b.error
        if a.pixels is not None:
            assert a.meta == b.meta and np.array_equal(a.pixels, b.pixels)


def test_pool_ships_every_spec_of_a_chunk_as_the_serial_path_decodes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers answer with one array per spec per chunk; a failed file's row must not leak into a view.
    files = folder(tmp_path / "data", 30, bad=(0, 13, 29))
    monkeypatch.setattr(ingest, "POOL_THRESHOLD", 10)
    monkeypatch.setattr(ingest, "CHUNK", 4)
    specs = [InputSpec(8, 1), InputSpec(16, 3)]
    pooled = list(ingest.decode_all(files, specs, workers=2))
    serial = list(ingest.decode_all(files, specs, workers=1))
    assert [d.file for d in pooled] == files
    for a, b in zip(pooled, serial, strict=True):
        assert (a.error, a.meta, len(a.views)) == (b.error, b.meta, len(b.views))
        for x, y in zip(a.views, b.views, strict=True):
            assert x.shape == y.shape and x.dtype == y.dtype == np.uint8 and np.array_equal(x, y)
    assert [i for i, d in enumerate(pooled) if d.error] == [0, 13, 29]


def test_one_decode_gives_the_array_of_every_spec_as_separate_decodes_do(tmp_path: Path) -> None:
    files = folder(tmp_path / "data", 5)
    grey, colour = InputSpec(8, 1), InputSpec(16, 3)
    both = list(ingest.decode_all(files, [grey, colour], workers=1))
    for spec, n in ((grey, 0), (colour, 1)):
        alone = list(ingest.decode_all(files, spec, workers=1))
        for a, b in zip(both, alone, strict=True):
            assert a.views[n].shape == spec.shape and np.array_equal(a.views[n], b.pixels)


def test_a_few_large_files_are_decoded_in_the_pool_many_small_ones_too() -> None:
    photos = [FileInfo(f"/p{i}.jpg", 3 << 20, 0.0, None) for i in range(20)]  # 60 MB: seconds of decoding
    icons = [FileInfo(f"/i{i}.png", 300, 0.0, None) for i in range(20)]
    assert ingest.uses_pool(photos, workers=2) and not ingest.uses_pool(icons, workers=2)
    assert ingest.uses_pool(icons * 100, workers=2)  # 2,000 files
    assert not ingest.uses_pool(photos[:3], workers=2)  # fewer than two per worker


class _RecordingPool:
    """Runs each task at once and records how many were submitted, to check the bound."""

    def __init__(self) -> None:
        self.submitted = 0

    def apply_async(self, fn, args):
        self.submitted += 1
        result = fn(*args)

        class Done:
            def ready(self):
                return True

            def get(self):
                return result

        return Done()


def test_no_more_than_ahead_chunks_are_submitted_before_they_are_consumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = folder(tmp_path / "data", 50)
    monkeypatch.setattr(ingest, "CHUNK", 2)
    monkeypatch.setattr(ingest, "AHEAD", 4)
    pool = _RecordingPool()
    consumed = 0
    for _ in ingest._bounded(pool, files, (SPEC,), 10**8, 1):  # type: ignore[arg-type]
        consumed += 1
        # Chunks fully or partly consumed, plus at most AHEAD waiting: never the whole folder at once.
        assert pool.submitted <= -(-consumed // 2) + 4
    assert consumed == 50 and pool.submitted == 25
