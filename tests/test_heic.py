"""HEIC/HEIF (pillow-heif) and AVIF (Pillow's own plug-in): decode, probe, orientation, the pixel limit,
scanning and indexing; and, with the plug-in missing, files counted by ending in the index summary."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, features

from embedsearch.cli.main import main
from embedsearch.data import images
from embedsearch.data.images import InputSpec, decode_bytes, header_pixels, load_image, probe, scan, skipped_text
from embedsearch.engine import Engine
from embedsearch.errors import ImageError
from helpers import noise_image, png_bytes

REPO = Path(__file__).resolve().parents[1]
needs_heif = pytest.mark.skipif(
    not images.readable_endings() >= {".heic"}, reason="pillow-heif is not installed (pip install 'embedsearch[heic]')"
)
needs_avif = pytest.mark.skipif(
    "avif" not in features.modules or not features.check_module("avif"), reason="this Pillow has no AVIF"
)


def encoded(im: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    """``im`` written as HEIF or AVIF (high quality), with an EXIF orientation if given."""
    images.readable_endings()  # registers the HEIF opener and saver
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=95, exif=exif.tobytes())
    return buf.getvalue()


def half_white(width: int = 40, height: int = 20) -> Image.Image:
    im = Image.new("RGB", (width, height), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, width // 2, height))  # left half white
    return im


@pytest.fixture
def without_heif(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """pillow-heif as if it were not installed (its import fails), and Pillow without AVIF."""
    monkeypatch.setitem(sys.modules, "pillow_heif", None)
    real = features.check_module
    monkeypatch.setattr(features, "check_module", lambda name: name != "avif" and real(name))
    images._register_plugins.cache_clear()
    yield
    monkeypatch.undo()
    images._register_plugins.cache_clear()


@needs_heif
@pytest.mark.parametrize("fmt", ["HEIF", pytest.param("AVIF", marks=needs_avif)])
def test_heif_and_avif_decode_upright_with_their_exif_orientation(fmt: str, tmp_path: Path) -> None:
    # Rotate 90 degrees clockwise when displayed (pillow-heif stores it as the HEIF irot/imir boxes,
    # libheif applies them on decoding; Pillow's AVIF plug-in gives it back as EXIF, which we apply).
    data = encoded(half_white(), fmt, orientation=6)
    meta, arr = decode_bytes(data, InputSpec(40, 1), "photo")
    assert (meta.format, meta.width, meta.height) == (fmt, 20, 40)
    # Displayed upright: 20 wide, 40 tall, white on top, padded left and right with white.
    assert arr[5, 20, 0] > 200 and arr[35, 20, 0] < 60
    path = tmp_path / f"photo.{fmt.lower()}"
    path.write_bytes(data)
    assert load_image(path).size == (20, 40)  # grids and thumbnails see it upright too


@needs_heif
def test_heic_without_orientation_keeps_its_pixels() -> None:
    meta, arr = decode_bytes(encoded(half_white(), "HEIF"), InputSpec(40, 1))
    assert (meta.width, meta.height) == (40, 20)
    assert arr[20, 5, 0] > 200 and arr[20, 35, 0] < 60  # left white, right black


@needs_heif
def test_probe_and_header_pixels_read_a_heic_header(tmp_path: Path) -> None:
    path = tmp_path / "IMG_0001.HEIC"
    data = encoded(noise_image(5, 48).resize((48, 32)), "HEIF", orientation=8)
    path.write_bytes(data)
    assert probe(str(path)) == (32, 48, False)  # upright: the orientation is applied by libheif
    assert header_pixels(data) == 32 * 48


@needs_heif
def test_a_heic_over_the_pixel_limit_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from pillow_heif.heif import BaseImage

    decoded: list[tuple[int, int]] = []
    real = BaseImage.data.fget

    def spy(self: BaseImage):  # type: ignore[no-untyped-def]  # libheif decodes when .data is first read
        decoded.append(self.size)
        return real(self)

    monkeypatch.setattr(BaseImage, "data", property(spy))
    data = encoded(noise_image(6, 64), "HEIF")
    with pytest.raises(ImageError, match="64x64 is more than 1000 pixels"):
        decode_bytes(data, InputSpec(16, 3), "big.heic", max_pixels=1000)
    assert decoded == []  # the header said too much: nothing was decoded
    decode_bytes(data, InputSpec(16, 3), "ok.heic")
    assert decoded == [(64, 64)]


@needs_heif
def test_a_damaged_heic_is_one_clear_reason() -> None:
    data = encoded(noise_image(7, 64), "HEIF")
    for bad in (data[: len(data) // 2], data[:40]):
        with pytest.raises(ImageError, match="cannot decode|not an image") as info:
            decode_bytes(bad, InputSpec(16, 3), "cut.heic")
        assert info.value.path == "cut.heic"


@needs_heif
def test_scan_and_index_pick_up_heic_heif_and_avif(tmp_path: Path, engine: Engine) -> None:
    data = tmp_path / "photos"
    data.mkdir()
    (data / "a.png").write_bytes(png_bytes(noise_image(8, 32)))
    (data / "b.HEIC").write_bytes(encoded(noise_image(9, 32), "HEIF", orientation=6))
    (data / "c.heif").write_bytes(encoded(noise_image(10, 32), "HEIF"))
    (data / "b.xmp").write_text("<x:xmpmeta/>")  # a sidecar: not an image, passed over
    if ".avif" in images.readable_endings():
        (data / "d.avif").write_bytes(encoded(noise_image(11, 32), "AVIF"))
    skipped = Counter[str]()
    names = sorted(Path(f.path).name for f in scan(data, skipped))
    assert names == sorted(p.name for p in data.iterdir() if p.suffix != ".xmp") and not skipped
    report = engine.index(str(data), "pixels", workers=0)
    assert (report.added, report.failed, report.skipped_endings) == (len(names), [], {})
    formats = {r.format for r in (engine.image(i) for i in engine.vector_index("pixels").ids().tolist())}
    assert formats >= {"PNG", "HEIF"}


@needs_heif
@pytest.mark.parametrize("fmt", ["HEIF", pytest.param("AVIF", marks=needs_avif)])
def test_a_heic_or_avif_upload_is_stored_and_served_with_its_type(indexed: Engine, fmt: str) -> None:
    data = encoded(noise_image(13, 32), fmt)
    added = indexed.add_image(data, name=f"phone.{fmt.lower()}")
    assert added.created and indexed.image(added.id).format == fmt
    assert indexed.image_bytes(added.id) == (data, {"HEIF": "image/heif", "AVIF": "image/avif"}[fmt])


def test_without_the_plugin_the_summary_counts_heic_with_the_install_hint(
    tmp_path: Path, home: Path, without_heif: None
) -> None:
    data = tmp_path / "phone"
    (data / "2024").mkdir(parents=True)
    (data / "2024" / "a.png").write_bytes(png_bytes(noise_image(12, 32)))
    for name in ("IMG_1.HEIC", "IMG_2.heic", "IMG_3.heic"):
        (data / "2024" / name).write_bytes(b"not read at all")
    for name in ("IMG_1.xmp", "IMG_1.json", "notes.txt", "IMG_4.MOV", ".hidden.heic"):
        (data / "2024" / name).write_bytes(b"x")  # sidecars, videos, hidden: not counted
    result = CliRunner().invoke(main, ["--home", str(home), "index", str(data), "--model", "pixels"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-2].startswith("1 file, model 'pixels': added 1,")
    assert (
        lines[-1] == "skipped 3 files with unsupported endings: .heic x3 (pip install 'embedsearch[heic]' to read them)"
    )
    (data / "raw.CR2").write_bytes(b"x")
    (data / "b.avif").write_bytes(b"x")
    out = CliRunner().invoke(main, ["--home", str(home), "index", str(data), "--model", "pixels", "--json"]).output
    report = json.loads(out)
    assert report["skipped_endings"] == {".heic": 3, ".cr2": 1, ".avif": 1} and report["unchanged"] == 1


def test_a_heic_named_on_the_command_line_says_what_to_install(tmp_path: Path, without_heif: None) -> None:
    path = tmp_path / "IMG_1.HEIC"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(16))  # not readable without the plug-in
    with pytest.raises(ImageError, match=r"not a supported format\); pip install 'embedsearch\[heic\]' to read .heic"):
        load_image(path)
    with pytest.raises(ImageError, match=r"not a supported format\)$"):
        decode_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(16), InputSpec(8, 1), "upload.png")


def test_the_skipped_line_names_the_endings_each_hint_is_for() -> None:
    assert skipped_text({".nef": 1}) == "skipped 1 file with unsupported endings: .nef x1"
    assert skipped_text({".heic": 2, ".heif": 1, ".avif": 1, ".dng": 4}) == (
        "skipped 8 files with unsupported endings: .dng x4, .heic x2, .avif x1, .heif x1 "
        "(pip install 'embedsearch[heic]' to read .heic/.heif; pip install -U pillow to read .avif)"
    )


def test_importing_embedsearch_registers_no_plugin() -> None:
    code = "import sys, embedsearch.data.images; print('pillow_heif' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
