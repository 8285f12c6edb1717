"""Hostile input: every kind of bad file, bulk-indexed in one run (API and CLI) and uploaded one by one.

The corpus is made in code. Each file has one expected outcome: indexed, or skipped with a reason
(a substring of the message the run reports). A run meets each bad file exactly once, says why it
skipped it, and carries on; the library stays consistent (``Engine.check``) and holds exactly the
good files. ``test_images.py`` covers single decodes; this file covers whole runs over a folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from embedsearch.data.images import InputSpec, decode_bytes
from embedsearch.engine import Engine
from embedsearch.errors import DataError, ImageError
from embedsearch.http.app import create_app
from embedsearch.http.security import RequestLimit
from embedsearch.results import QueryResult
from helpers import live_server, noise_image, png_bytes

#: The Engine runs use a lowered pixel limit, so that a real (decodable) image can be over it.
LOW_MAX_PIXELS = 250_000
LOOP = "broken or looping symlink"


@dataclass(frozen=True)
class Expect:
    reason: str | None = None  # None: indexed; otherwise a substring of the reason it is skipped with
    reason_default_limit: str | None = "same"  # outcome under the default pixel limit (the CLI), if other

    def at(self, low_limit: bool) -> str | None:
        return self.reason if low_limit or self.reason_default_limit == "same" else self.reason_default_limit


GOOD = Expect()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, body: bytes = zlib.compress(b"\0" * 64)) -> bytes:
    """A well-formed grey PNG whose header declares ``width`` x ``height`` over ``body``."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def tiff_declaring(width: int, height: int) -> bytes:
    """A small TIFF whose width and height tags are rewritten to claim a huge image."""
    data = bytearray(png_bytes(Image.new("L", (3, 5)), "TIFF"))
    ifd = int.from_bytes(data[4:8], "little")
    for i in range(int.from_bytes(data[ifd : ifd + 2], "little")):
        at = ifd + 2 + 12 * i
        tag = int.from_bytes(data[at : at + 2], "little")
        if tag in (256, 257):
            data[at : at + 12] = struct.pack("<HHII", tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    """A small GIF whose logical screen is rewritten to ``width`` x ``height``."""
    data = png_bytes(Image.new("L", (4, 4)), "GIF")
    return data[:6] + struct.pack("<HH", width, height) + data[10:]


def build_corpus(root: Path) -> dict[str, Expect]:
    """Write the hostile corpus under ``root``; return relative path -> expected outcome.

    Every good file has its own content (no accidental duplicates) except ``link-to-plain.png``.
    """
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, Expect] = {}

    def put(rel: str, data: bytes, outcome: Expect) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expect[rel] = outcome

    png = png_bytes(noise_image(1, 64))
    jpeg = png_bytes(noise_image(2, 64), "JPEG")
    grey = np.asarray(noise_image(3, 12, "L"))
    frames = [Image.fromarray(np.full((16, 16), v, np.uint8), "L") for v in (0, 128, 255)]

    # Good: odd sizes, modes, formats and names.
    put("plain.png", png_bytes(noise_image(10)), GOOD)
    put("png-named.jpg", png_bytes(noise_image(11)), GOOD)  # the content decides the decoder
    put("1x1.png", png_bytes(Image.new("RGB", (1, 1), (200, 10, 10))), GOOD)
    put("wide-20000x10.png", png_bytes(Image.new("RGB", (20000, 10), (0, 90, 0))), GOOD)
    put("sixteen-bit.png", png_bytes(Image.fromarray(grey.astype(np.uint16) * 257)), GOOD)
    put("cmyk.jpg", png_bytes(noise_image(12).convert("CMYK"), "JPEG"), GOOD)
    put("palette.png", png_bytes(noise_image(13).convert("P")), GOOD)
    put("grey-alpha-LA.png", png_bytes(noise_image(14, mode="RGBA").convert("LA")), GOOD)
    put("animated.gif", png_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40), GOOD)
    put("with space.png", png_bytes(noise_image(15)), GOOD)
    put("non-ascii-café-日本.png", png_bytes(noise_image(16)), GOOD)
    put("new\nline.png", png_bytes(noise_image(17)), GOOD)
    put("folder.png/inside.png", png_bytes(noise_image(18)), GOOD)  # a folder named like an image
    # A real image, small enough by default but over LOW_MAX_PIXELS (600 x 600 = 360,000 pixels).
    put(
        "moderate-600x600.png",
        png_bytes(Image.linear_gradient("L").resize((600, 600))),
        Expect("600x600 is more than 250000 pixels", reason_default_limit=None),
    )

    # Bad: each skipped with its own reason.
    put("empty.png", b"", Expect("empty file"))
    put("truncated.png", png[: len(png) // 2], Expect("truncated"))
    put("truncated.jpg", jpeg[: len(jpeg) // 2], Expect("truncated"))
    put("truncated ünï cödé name.png", png[: len(png) // 3], Expect("cannot decode (image file is truncated"))
    put("text.png", b"hello, I am a text file\n" * 4, Expect("not an image"))
    put("zero-size-0x0.png", png_declaring(0, 0), Expect("not an image"))
    put("bomb-100000x100000.png", png_declaring(100_000, 100_000), Expect("decompression bomb"))
    put("bomb-100000x100000.tif", tiff_declaring(100_000, 100_000), Expect("decompression bomb"))
    put("bomb-65535x65535.gif", gif_declaring(65_535, 65_535), Expect("decompression bomb"))
    # A real, fully decodable 56-megapixel image (57 kB on disk): over the default limit too.
    put(
        "bomb-8000x7000-real.png",
        png_declaring(8000, 7000, zlib.compress(b"\0" * (8001 * 7000), 9)),
        Expect("8000x7000 is more than"),
    )

    # Links: a loop between two names, a link to itself, a dangling one, a duplicate, a folder loop.
    os.symlink("loop-b.png", root / "loop-a.png")
    os.symlink("loop-a.png", root / "loop-b.png")
    os.symlink("self-loop.png", root / "self-loop.png")
    os.symlink(root / "no-such-file.png", root / "dangling.png")
    expect.update(
        {
            "loop-a.png": Expect(LOOP),
            "loop-b.png": Expect(LOOP),
            "self-loop.png": Expect(LOOP),
            "dangling.png": Expect(LOOP),
        }
    )
    os.symlink("plain.png", root / "link-to-plain.png")  # same bytes as plain.png: stored once
    expect["link-to-plain.png"] = GOOD
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")  # a folder loop: not followed, nothing to report
    return expect


#: Relative path -> (format, mode, width, height) recorded for it.
STORED_FACTS = {
    "png-named.jpg": ("PNG", "RGB", 16, 16),
    "1x1.png": ("PNG", "RGB", 1, 1),
    "wide-20000x10.png": ("PNG", "RGB", 20000, 10),
    "sixteen-bit.png": ("PNG", "I;16", 12, 12),
    "cmyk.jpg": ("JPEG", "CMYK", 16, 16),
    "palette.png": ("PNG", "P", 16, 16),
    "grey-alpha-LA.png": ("PNG", "LA", 16, 16),
    "animated.gif": ("GIF", "P", 16, 16),
}
#: The two names with the same content; exactly one of them is stored.
SAME_CONTENT = {"plain.png", "link-to-plain.png"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Expect]]:
    root = tmp_path_factory.mktemp("hostile").resolve() / "corpus"
    return root, build_corpus(root)


def split(root: Path, expect: dict[str, Expect], low_limit: bool) -> tuple[set[str], dict[str, str]]:
    """(absolute paths that should be indexed, absolute path -> reason substring of those skipped)."""
    good = {str(root / rel) for rel, e in expect.items() if e.at(low_limit) is None}
    bad = {str(root / rel): e.at(low_limit) for rel, e in expect.items() if e.at(low_limit) is not None}
    return good, bad  # type: ignore[return-value]


def assert_library_holds(home: Path, good: set[str], max_pixels: int | None = None) -> None:
    """The library is consistent and holds exactly the good files (one of the two same-content ones)."""
    with Engine(home, **({"max_pixels": max_pixels} if max_pixels else {})) as engine:
        report = engine.check()
        assert report.ok, report.problems
        model = engine.model("pixels")
        ids = engine.store.entry_image_ids(model.id)
        assert len(ids) == len(set(ids)) == engine.info().images
        assert sorted(engine.vector_index("pixels").ids().tolist()) == sorted(ids)
        stored = {row.path for row in engine.store.images(ids).values()}
    same = {p for p in good if Path(p).name in SAME_CONTENT}
    assert len(stored & same) == 1, stored & same
    assert stored - same == good - same


# -- the whole corpus in one run -----------------------------------------------------------------


def test_engine_index_skips_each_bad_file_once_with_its_reason(tmp_path: Path, corpus) -> None:
    root, expect = corpus
    good, bad = split(root, expect, low_limit=True)
    with Engine(tmp_path / "home", max_pixels=LOW_MAX_PIXELS) as engine:
        report = engine.index(str(root), "pixels", batch_size=4)
        failed = [path for path, _ in report.failed]
        assert sorted(failed) == sorted(bad), "every bad file reported, each exactly once"
        for path, reason in report.failed:
            assert bad[path] in reason, (path, reason)
        assert report.scanned == len(expect)
        assert (report.added, report.duplicates, report.updated) == (len(good) - 1, 1, 0)
        # What was stored about the odd ones: the content's format, mode and size, not the name's.
        facts = {rel: engine.store.image_by_path(str(root / rel)) for rel in STORED_FACTS}
        assert {rel: (r.format, r.mode, r.width, r.height) for rel, r in facts.items()} == STORED_FACTS
        # A second run reads only the failures again, and reports them again.
        again = engine.index(str(root), "pixels")
        assert (again.added, again.unchanged, sorted(p for p, _ in again.failed)) == (0, len(good) - 1, sorted(bad))
        # Querying with the whole corpus: one answer per file, failures with a reason, nothing raised.
        answers = list(engine.query([str(root)], "pixels", k=1))
        hits = {a.query: a.results for a in answers if isinstance(a, QueryResult)}
        refused = {a[0]: a[1] for a in answers if not isinstance(a, QueryResult)}
        assert set(hits) == good and set(refused) == set(bad)
        assert all(len(r) == 1 and r[0].distance == pytest.approx(0.0, abs=1e-4) for r in hits.values())
        assert all("cannot read file" in refused[p] for p in refused if bad[p] == LOOP)
    assert_library_holds(tmp_path / "home", good, LOW_MAX_PIXELS)


def run_cli(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedsearch", "--home", str(home), *args],
        check=False,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
    )


@pytest.mark.slow
def test_cli_index_lists_each_bad_file_once_and_exits_0(tmp_path: Path, corpus) -> None:
    root, expect = corpus
    good, bad = split(root, expect, low_limit=False)
    home = tmp_path / "home"
    run = run_cli(home, "index", str(root), "--model", "pixels")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    for path, reason in bad.items():
        assert run.stdout.count(f"failed: {path}: ") == 1, path
        line = run.stdout.split(f"failed: {path}: ", 1)[1].split("\n", 1)[0]
        assert reason in line, (path, line)
        assert f"skipped {path}: " not in run.stderr, path  # listed after the run, not again as a log line (-v)
    assert run.stdout.count("failed: ") == len(bad)
    assert (
        f"{len(expect)} files, model 'pixels': added {len(good) - 1}, updated 0, unchanged 0, "
        f"duplicates 1, failed {len(bad)}"
    ) in run.stdout
    again = run_cli(home, "index", str(root), "--model", "pixels", "--json")
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["added"], summary["unchanged"], summary["scanned"]) == (0, len(good) - 1, len(expect))
    assert sorted(f["path"] for f in summary["failed"]) == sorted(bad)
    assert all(bad[f["path"]] in f["reason"] for f in summary["failed"])
    check = run_cli(home, "check", "--json")
    assert check.returncode == 0 and json.loads(check.stdout)["ok"], check.stdout
    assert_library_holds(home, good)


# -- the same files uploaded one by one ------------------------------------------------------------


def test_upload_of_each_hostile_file_is_stored_or_a_clean_image_error(tmp_path: Path, corpus) -> None:
    root, expect = corpus
    with Engine(tmp_path / "home", max_pixels=LOW_MAX_PIXELS) as engine:
        engine.create_model("pixels", "pixels", image_size=16, channels=3)
        expected = sum(e.at(low_limit=True) is None and not (root / r).is_symlink() for r, e in expect.items())
        for rel, outcome in sorted(expect.items()):
            path = root / rel
            if path.is_symlink():
                continue  # an upload is bytes; links have none of their own
            data = path.read_bytes()
            reason = outcome.at(low_limit=True)
            if reason is None:
                added = engine.add_image(data, name=rel)
                assert added.created, rel
                top = engine.search_bytes(data, "pixels", k=1)[0]
                assert top.distance == pytest.approx(0.0, abs=1e-4), rel
            else:
                before = engine.store.counts()
                with pytest.raises(ImageError) as info:
                    engine.add_image(data, name=rel)
                assert info.value.path == rel and reason in info.value.reason, (rel, info.value.reason)
                assert engine.store.counts() == before  # nothing half-stored
        assert engine.store.counts()["images"] == expected > 10
        assert engine.check().ok


# -- folders with nothing to index ----------------------------------------------------------------


@pytest.mark.slow
def test_empty_folder_with_a_model_reports_0_scanned(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    home = tmp_path / "home"
    with Engine(home) as engine:
        engine.create_model("pixels", "pixels", image_size=8, channels=1)
        report = engine.index(str(tmp_path / "empty"), "pixels")
        assert (report.scanned, report.added, report.failed) == (0, 0, [])
        with pytest.raises(DataError, match="holds no images"):
            list(engine.query([str(tmp_path / "empty")], "pixels"))
    run = run_cli(home, "index", str(tmp_path / "empty"), "--model", "pixels")
    assert run.returncode == 0 and run.stdout.startswith("0 files, model 'pixels': added 0"), run
    query = run_cli(home, "query", str(tmp_path / "empty"), "--model", "pixels")
    assert query.returncode == 1 and "Traceback" not in query.stderr
    assert query.stderr.strip().splitlines() == [f"Error: {tmp_path / 'empty'}: the folder holds no images"]


def test_empty_folder_on_a_new_library_is_a_clear_error_and_creates_no_model(tmp_path: Path) -> None:
    """Nothing to infer the pixels model's input size from: one clear line, exit 1, no model made."""
    (tmp_path / "empty").mkdir()
    run = run_cli(tmp_path / "home", "index", str(tmp_path / "empty"), "--model", "pixels")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines() == ["Error: no images to infer the input size and channels from"]
    with Engine(tmp_path / "home") as engine:
        assert engine.models() == []


@pytest.mark.parametrize(
    "files",
    [
        pytest.param({"text.png": b"not an image", "empty.jpg": b""}, id="text-and-empty"),
        pytest.param({"text.png": b"not an image", "zero.png": png_declaring(0, 0)}, id="with-a-0x0-png"),
    ],
)
def test_folder_of_only_bad_files_on_a_new_library_is_a_clear_error(tmp_path: Path, files: dict[str, bytes]) -> None:
    """No image to infer the pixels model's input from: a clear DataError (a 0x0 header is no image)."""
    for name, data in files.items():
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_bytes(data)
    with Engine(tmp_path / "home") as engine, pytest.raises(DataError, match="none of the files could be read"):
        engine.index(str(tmp_path / "data"), "pixels")


# -- files that cannot be read --------------------------------------------------------------------


def test_unreadable_file_is_skipped(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip(
            "running as root: chmod 000 does not stop root from reading (dangling links and "
            "link loops are the unreadable files of the corpus tests)"
        )
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.png").write_bytes(png_bytes(noise_image(1)))
    locked = data / "locked.png"
    locked.write_bytes(png_bytes(noise_image(2)))
    locked.chmod(0)
    with Engine(tmp_path / "home") as engine:
        report = engine.index(str(data), "pixels")
    assert report.added == 1
    assert [(p, r.split(" (")[0]) for p, r in report.failed] == [(str(locked), "cannot read file")]


def test_fifo_named_like_an_image_is_skipped_not_waited_on(tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer: index must skip it (holding the writer lock meanwhile
    would block the library for good). The test lets a stuck run go by opening the pipe for writing."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.png").write_bytes(png_bytes(noise_image(1)))
    fifo = data / "pipe.png"
    os.mkfifo(fifo)
    outcome: dict[str, object] = {}

    def index() -> None:
        with Engine(tmp_path / "home") as engine:
            try:
                outcome["report"] = engine.index(str(data), "pixels")
            except Exception as exc:  # noqa: BLE001 (reported below)
                outcome["error"] = exc

    worker = threading.Thread(target=index, daemon=True)
    worker.start()
    worker.join(timeout=3.0)
    hung = worker.is_alive()
    while worker.is_alive():  # let it go: a writer that opens and closes the pipe gives the reader EOF
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        time.sleep(0.05)
    assert not hung, "index waited on a FIFO"
    report = outcome["report"]
    assert report.added == 1 and [p for p, _ in report.failed] == [str(fifo)]  # type: ignore[attr-defined]


# -- files on which Pillow raises something other than OSError / ValueError -------------------------


def pillow_oddities() -> dict[str, bytes]:
    """Valid files of formats Pillow opens whatever their name, damaged so that Pillow raises
    NotImplementedError or RuntimeError (not OSError / ValueError) -- a .png may hold any of them."""
    dds = png_bytes(noise_image(1, mode="RGBA"), "DDS")
    blp = png_bytes(noise_image(2).convert("P"), "BLP")
    avif = png_bytes(noise_image(3), "AVIF")
    mdat, pitm = avif.index(b"mdat") + 4, avif.index(b"pitm") + 8
    return {
        "dds-pixel-format-flags-0.png": dds[:80] + b"\0\0\0\0" + dds[84:],  # NotImplementedError on open
        "blp-compression-255.png": blp[:4] + b"\xff" + blp[5:],  # BLPFormatError on load
        "avif-zeroed-mdat.png": avif[:mdat] + bytes(len(avif) - mdat),  # RuntimeError on load
        "avif-unknown-primary-item.png": avif[:pitm] + b"\x00\x09" + avif[pitm + 2 :],  # RuntimeError on open
    }


@pytest.mark.parametrize("name", sorted(pillow_oddities()))
def test_files_pillow_fails_on_oddly_are_image_errors_and_the_run_continues(tmp_path: Path, name: str) -> None:
    data = pillow_oddities()[name]
    with pytest.raises(ImageError):
        decode_bytes(data, InputSpec(16, 3), name)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "good.png").write_bytes(png_bytes(noise_image(4)))
    (folder / name).write_bytes(data)
    with Engine(tmp_path / "home") as engine:  # a new library: probe() meets the file first, then decode
        report = engine.index(str(folder), "pixels")
        assert report.added == 1 and [p for p, _ in report.failed] == [str(folder / name)]
        with pytest.raises(ImageError):
            engine.add_image(data, name=name)


# -- hostile requests to the service: bounded decoding ---------------------------------------------


def sixteen_bit_png(width: int, height: int, value: int = 0) -> bytes:
    """A real, fully decodable 16-bit grey PNG of one value: about 100 KB for 7000x7000 (98 MB decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    packer, row = zlib.compressobj(9), b"\0" + value.to_bytes(2, "big") * width
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


@pytest.fixture
def pixels_engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine(tmp_path / "home") as engine:
        engine.create_model("pixels", "pixels", image_size=16, channels=1)
        engine.add_image(png_bytes(noise_image(1, 16, "L")))
        yield engine


def search(client: TestClient, data: bytes) -> httpx.Response:
    return client.post("/api/search", files={"file": ("q.png", data)}, data={"model": "pixels", "k": "1"})


def test_a_query_image_over_the_query_cap_is_refused_from_its_header(pixels_engine: Engine, pillow_decodes) -> None:
    """The repro: 95 KB on the wire, 7000x7000 16-bit, took 9.3 s and +1.7 GB to answer."""
    data = sixteen_bit_png(7000, 7000)
    assert len(data) < 150_000
    with TestClient(create_app(pixels_engine), base_url="http://localhost") as client:
        answer = search(client, data)
    assert answer.status_code == 422 and pillow_decodes == []  # not decoded at all
    assert answer.json() == {"error": "q.png: 7000x7000 is more than 16000000 pixels (decompression bomb?)"}


def test_the_query_cap_is_configurable_and_stored_uploads_keep_the_library_limit(
    pixels_engine: Engine, pillow_decodes
) -> None:
    data = sixteen_bit_png(1500, 1000, value=40_000)
    with TestClient(create_app(pixels_engine, max_query_pixels=1_000_000), base_url="http://localhost") as client:
        refused = search(client, data)
        assert refused.status_code == 422 and "1500x1000 is more than 1000000 pixels" in refused.json()["error"]
        assert pillow_decodes == []
        stored = client.post("/api/images", files={"files": ("big.png", data)})
        assert stored.status_code == 200 and stored.json()["images"][0]["created"]
        assert pillow_decodes == [("PNG", (1500, 1000))]


@contextlib.contextmanager
def slot_held(client: TestClient, model: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A large search held inside its decode, so that it keeps the service's one decode slot, while
    the block runs; afterwards it completes (200)."""
    import embedsearch.core.search as search_module

    inside, release = threading.Event(), threading.Event()
    real = search_module.decode_bytes

    def held_decode(data: bytes, *args, **kwargs):  # type: ignore[no-untyped-def]
        if data == LARGE_QUERY:
            inside.set()
            release.wait(20)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(search_module, "decode_bytes", held_decode)
    answer: dict[str, httpx.Response] = {}
    form = {"model": model, "k": "1"}
    post = lambda: answer.setdefault("r", client.post("/api/search", files={"file": ("q", LARGE_QUERY)}, data=form))  # noqa: E731
    holder = threading.Thread(target=post)
    holder.start()
    try:
        assert inside.wait(20), "the large search never reached its decode"
        yield
    finally:
        release.set()
        holder.join(30)
    assert answer["r"].status_code == 200


#: Over the small-image lane (1 MP), under the query cap; the held search is the one with these bytes.
LARGE_QUERY = sixteen_bit_png(1200, 1000)


def assert_busy(answer: httpx.Response) -> None:
    assert answer.status_code == 503 and answer.headers["retry-after"] == "2"
    assert list(answer.json()) == ["error"] and "busy decoding" in answer.json()["error"]
    assert "\n" not in answer.text


def test_saturated_decode_slots_answer_503_with_retry_after_and_small_queries_pass(
    pixels_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One slot, held by a large decode: the next large image gets 503 after the short wait; a small
    one (an ordinary query) needs no slot and is answered; once free, large ones are answered again."""
    app = create_app(pixels_engine, max_decodes=1)
    app.state.service.decodes.wait = 0.2
    with TestClient(app, base_url="http://localhost") as client:
        with slot_held(client, "pixels", monkeypatch):
            assert_busy(search(client, sixteen_bit_png(1200, 1000, value=7)))
            assert_busy(client.post("/api/images", files={"files": ("big.png", sixteen_bit_png(1100, 1000))}))
            assert search(client, png_bytes(noise_image(2, 16, "L"))).status_code == 200  # no slot needed
        assert search(client, sixteen_bit_png(1200, 1000, value=7)).status_code == 200


def test_a_large_file_waits_for_a_slot_unread(pixels_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 1 MB, a body waits in its spooled temporary file: waiting requests hold no bodies in memory.
    Whatever its header says (a 16x16 image with 1.2 MB of padding in an ancillary chunk)."""
    from starlette.datastructures import UploadFile

    small = png_bytes(noise_image(3, 16, "L"))
    padded = small[:33] + _chunk(b"juNk", bytes(1_200_000)) + small[33:]  # after the IHDR chunk
    reads: list[str | None] = []
    real = UploadFile.read

    async def spy(self: UploadFile, size: int = -1) -> bytes:
        reads.append(self.filename)
        return await real(self, size)

    monkeypatch.setattr(UploadFile, "read", spy)
    app = create_app(pixels_engine, max_decodes=1)
    app.state.service.decodes.wait = 0.2
    form = {"model": "pixels", "k": "1"}
    with TestClient(app, base_url="http://localhost") as client:
        with slot_held(client, "pixels", monkeypatch):
            assert_busy(client.post("/api/search", files={"file": ("padded.png", padded)}, data=form))
            assert "padded.png" not in reads
        answer = client.post("/api/search", files={"file": ("padded.png", padded)}, data=form)
        assert answer.status_code == 200 and answer.json()["results"][0]["distance"] > 0


def test_generate_near_a_large_stored_image_takes_a_decode_slot(
    trained: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``near`` decodes the stored file (up to the library's 50 MP): not outside the bound."""
    app = create_app(trained, max_decodes=1)
    app.state.service.decodes.wait = 0.2
    with TestClient(app, base_url="http://localhost") as client:
        big = client.post("/api/images", files={"files": ("big.png", sixteen_bit_png(1500, 1000, value=9))})
        small = client.post("/api/images", files={"files": ("small.png", png_bytes(noise_image(5, 28, "L")))})
        near_big, near_small = ({"model": "vae", "n": 1, "near": r.json()["images"][0]["id"]} for r in (big, small))
        with slot_held(client, "vae", monkeypatch):
            assert_busy(client.post("/api/generate", json=near_big))
            assert client.post("/api/generate", json=near_small).status_code == 200
        assert client.post("/api/generate", json=near_big).status_code == 200


def test_an_upload_decodes_once_for_all_its_models(pixels_engine: Engine, pillow_decodes) -> None:
    for name in ("twin-a", "twin-b"):  # three models of one input spec, and one of another
        pixels_engine.create_model(name, "pixels", image_size=16, channels=1)
    pixels_engine.create_model("colour", "pixels", image_size=24, channels=3)
    data = png_bytes(noise_image(3, 200))
    pillow_decodes.clear()
    added = pixels_engine.add_image(data, name="photo.png")
    assert pillow_decodes == [("PNG", (200, 200))]
    assert sorted(pixels_engine.image(added.id).models) == ["colour", "pixels", "twin-a", "twin-b"]
    for model in ("pixels", "twin-a", "twin-b", "colour"):
        top = pixels_engine.search_bytes(data, model, k=1)[0]
        assert top.id == added.id and top.distance == pytest.approx(0.0, abs=1e-4)


def test_serve_takes_the_query_cap_and_the_number_of_decodes(
    pixels_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn
    from click.testing import CliRunner

    import embedsearch.malloc as memory
    from embedsearch.cli.serve import serve
    from embedsearch.http.state import DEFAULT_MAX_QUERY_PIXELS, default_decodes

    calls: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(app))
    monkeypatch.setattr(memory, "return_large_buffers", lambda: calls.append("large buffers returned"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # serve sets it
    obj = {"home": str(pixels_engine.home), "db": None, "quiet": True}
    assert CliRunner().invoke(serve, [], obj=obj).exit_code == 0
    assert calls[0] == "large buffers returned"
    service = calls[-1].state.service  # type: ignore[attr-defined]
    assert (service.max_query_pixels, service.decodes.slots) == (DEFAULT_MAX_QUERY_PIXELS, default_decodes())
    result = CliRunner().invoke(serve, ["--max-query-pixels", "4000000", "--max-decodes", "3"], obj=obj)
    assert result.exit_code == 0, result.output
    service = calls[-1].state.service  # type: ignore[attr-defined]
    assert (service.max_query_pixels, service.decodes.slots) == (4_000_000, 3)
    assert CliRunner().invoke(serve, ["--max-decodes", "0"], obj=obj).exit_code == 2
    assert CliRunner().invoke(serve, ["--max-requests", "5"], obj=obj).exit_code == 0
    limits = [m.kwargs["limit"] for m in calls[-1].user_middleware if m.cls is RequestLimit]  # type: ignore[attr-defined]
    assert limits == [5]
    assert CliRunner().invoke(serve, ["--max-requests", "0"], obj=obj).exit_code == 2


def test_clients_that_hold_requests_open_get_json_503s_beyond_the_limit_and_nothing_else_changes(
    pixels_engine: Engine,
) -> None:
    """Two uploads that send their headers and then nothing hold the two request places of a
    service with --max-requests 2: a third request gets 503 JSON with Retry-After, at once; once
    they hang up, requests are answered again."""
    import socket
    from urllib.parse import urlsplit

    before = pixels_engine.stats()["images"]
    with live_server(create_app(pixels_engine, max_requests=2)) as url:
        address = urlsplit(url)
        held = []
        for _ in range(2):
            conn = socket.create_connection((address.hostname, address.port), timeout=10)
            conn.sendall(
                b"POST /api/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                b"Content-Type: multipart/form-data; boundary=x\r\n\r\n--x"
            )
            held.append(conn)
        with httpx.Client(base_url=url, timeout=10) as http:
            deadline = time.monotonic() + 10
            busy = http.get("/api/health")
            while busy.status_code != 503 and time.monotonic() < deadline:  # until both are in progress
                time.sleep(0.05)
                busy = http.get("/api/health")
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.headers["content-type"] == "application/json"
            assert "busy with 2 requests" in busy.json()["error"]
            for conn in held:
                conn.close()
            answered = http.get("/api/health")
            while answered.status_code == 503 and time.monotonic() < deadline:
                time.sleep(0.05)
                answered = http.get("/api/health")
            assert answered.status_code == 200
    assert pixels_engine.stats()["images"] == before


def test_the_service_process_returns_large_freed_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc would keep freed decodes in per-thread arenas (benchmarks/hostile.py: 1.18 GB against 520 MB)."""
    from embedsearch.malloc import return_large_buffers

    if not sys.platform.startswith("linux"):
        pytest.skip("mallopt is glibc's")
    assert return_large_buffers() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the user's own setting wins
    assert return_large_buffers() is False
