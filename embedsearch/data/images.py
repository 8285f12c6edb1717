"""Finding, reading and normalising image files: file -> bytes -> (metadata, uint8 pixel array)."""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import os
import stat
import struct
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from embedsearch.data.resize import FITS, QUARTER_TURNS, TRANSPOSE, draft, draft_size, fitted, prepared, white_point
from embedsearch.errors import DataError, ImageError, InvalidArgumentError

log = logging.getLogger(__name__)

#: File endings a folder scan always picks up (case-insensitive). The content decides the decoder.
EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
#: Endings read only when their decoder is installed: HEIF through pillow-heif, AVIF through a Pillow
#: built with libavif. Without it a scan counts them, with what to install (see :func:`skipped_text`).
_HEIF_ENDINGS = frozenset({".heic", ".heif", ".hif"})
_AVIF_ENDINGS = frozenset({".avif"})
#: Image files a scan cannot use but counts by ending, so that a photo folder's RAW, HEIC or PSD files
#: are never left out without a word. Other files (sidecars .xmp/.json/.txt, videos) are not images:
#: they are passed over quietly.
UNREADABLE_ENDINGS = (
    _HEIF_ENDINGS
    | _AVIF_ENDINGS
    | frozenset(
        {".cr2", ".cr3", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".orf", ".rw2", ".raf", ".pef", ".srw", ".raw"}
        | {".jxl", ".svg", ".psd"}
    )
)
#: What makes each group of endings readable (Pillow reads AVIF itself when built with libavif, as
#: its recent wheels are; pillow-heif 1.x left AVIF to Pillow).
_INSTALL_HINTS = {_HEIF_ENDINGS: "pip install 'embedsearch[heic]'", _AVIF_ENDINGS: "pip install -U pillow"}
#: Images with more pixels than this are refused before decoding (decompression-bomb guard).
DEFAULT_MAX_PIXELS = 50_000_000
#: ``train`` infers the input size from the data but never beyond this.
MAX_INFERRED_SIZE = 64
#: ... from the headers of at most this many files.
INFER_SAMPLE = 2000
#: What Pillow's many decoders raise on damaged input (each plug-in has its own habits).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    NotImplementedError,
    RuntimeError,
    ZeroDivisionError,
    struct.error,
)
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


@dataclass(frozen=True)
class InputSpec:
    """What an encoder takes: square ``image_size`` pixels with 1 (grey) or 3 (RGB) channels, made by
    the resize policy ``fit`` (:data:`embedsearch.data.resize.FITS`: pad or crop)."""

    image_size: int
    channels: int
    fit: str = "pad"

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise InvalidArgumentError(f"unknown fit {self.fit!r}; choose one of {', '.join(FITS)}")
        if self.channels not in (1, 3):
            raise InvalidArgumentError(f"channels must be 1 or 3, not {self.channels}")
        if not 1 <= self.image_size <= 1024:
            raise InvalidArgumentError(f"image size must be between 1 and 1024, not {self.image_size}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)


@dataclass(frozen=True)
class FileInfo:
    """A file found by a scan, with what ``stat`` says (used for incremental re-indexing)."""

    path: str
    size: int
    mtime: float
    label: str | None


@dataclass(frozen=True)
class ImageMeta:
    sha256: str
    width: int
    height: int
    format: str
    mode: str
    bytes: int


@cache
def _register_plugins() -> frozenset[str]:
    """Register the optional decoders once (on first use, never at import) -> the endings they add."""
    from PIL import features

    endings: set[str] = set()
    # By name: an optional extra, so that mypy passes with or without it. A wheel whose C library
    # cannot load raises its ImportError only when the opener is registered.
    try:
        importlib.import_module("pillow_heif").register_heif_opener()
    except ImportError as exc:
        log.debug("HEIC/HEIF files are not read: %s", exc)
    else:
        endings |= _HEIF_ENDINGS
    if "avif" in features.modules and features.check_module("avif"):  # a Pillow built with libavif
        endings |= _AVIF_ENDINGS
    return frozenset(endings)


def readable_endings() -> frozenset[str]:
    """Every ending a scan picks up here: the built-in ones and those of the installed plug-ins."""
    return EXTENSIONS | _register_plugins()


def skipped_text(counts: Mapping[str, int]) -> str:
    """One line for a scan's unreadable image files, e.g. "skipped 3 files with unsupported endings: .heic x3
    (pip install 'embedsearch[heic]' to read them)"."""
    total = sum(counts.values())
    parts = ", ".join(f"{ending} x{n}" for ending, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    hints = []
    for endings, command in _INSTALL_HINTS.items():
        if covered := sorted(endings & counts.keys()):
            hints.append(f"{command} to read {'them' if len(covered) == len(counts) else '/'.join(covered)}")
    tail = f" ({'; '.join(hints)})" if hints else ""
    return f"skipped {total} file{'s' if total != 1 else ''} with unsupported endings: {parts}{tail}"


def _hint(name: str) -> str:
    """What to install for a file named like a format whose plug-in is missing ("" if nothing helps)."""
    ending = os.path.splitext(name)[1].lower()
    if ending in readable_endings():
        return ""
    return next((f"; {command} to read {ending}" for group, command in _INSTALL_HINTS.items() if ending in group), "")


def scan(root: str | os.PathLike[str], skipped: Counter[str] | None = None) -> Iterator[FileInfo]:
    """Yield every image-named file under ``root`` (or ``root`` itself if it is a file).

    Hidden files and folders are skipped; symlinked folders are not followed (no loops), symlinked
    files are. Label = name of the first-level subfolder under ``root``, if any. Image files of a
    format that cannot be read here (:data:`UNREADABLE_ENDINGS`) are counted by ending in ``skipped``.
    """
    endings = readable_endings()
    root_path = Path(root)
    if root_path.is_file():
        st = root_path.stat()
        yield FileInfo(str(root_path.resolve()), st.st_size, st.st_mtime, None)
        return
    if not root_path.is_dir():
        raise DataError(f"{root}: no such file or folder")

    def walk(folder: str, label: str | None) -> Iterator[FileInfo]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            log.warning("%s: cannot list folder (%s)", folder, exc.strerror or exc)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    yield from walk(entry.path, label if label is not None else entry.name)
                elif (ending := os.path.splitext(entry.name)[1].lower()) in endings:
                    st = entry.stat()
                    regular = stat.S_ISREG(st.st_mode)  # a FIFO or device would block or never end
                    yield FileInfo(entry.path, st.st_size if regular else -1, st.st_mtime, label)
                elif ending in UNREADABLE_ENDINGS and skipped is not None:
                    skipped[ending] += 1
            except OSError:
                # A dangling or looping symlink: report it like any unreadable file.
                yield FileInfo(entry.path, -1, 0.0, label)

    yield from walk(str(root_path.resolve()), None)


def _regular(path: str) -> None:
    """Refuse anything but a regular file: opening a FIFO named x.png would wait forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ImageError(path, f"cannot read file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise ImageError(path, "not a regular file")


def read_bytes(path: str) -> bytes:
    """The whole file; refused unless it is a regular file. One open and one fstat: a bulk run of
    small images spends as long in these system calls as in decoding. O_NONBLOCK, so that opening a
    FIFO left in a folder returns at once (and is then refused) instead of waiting for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ImageError(path, f"cannot read file ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(path, "not a regular file")
        data = os.read(fd, info.st_size + 1)  # + 1: tells a file that grew since it was stat'ed
        if len(data) == info.st_size:
            return data
        parts = [data]  # grew, or a short read: read on to the end
        while parts[-1]:
            parts.append(os.read(fd, 1 << 20))
        return b"".join(parts)
    except OSError as exc:
        raise ImageError(path, f"cannot read file ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _header(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open lazily (the header only) and refuse images over the pixel limit before anything is decoded."""
    if not data:
        raise ImageError(name, "empty file")
    _register_plugins()
    with warnings.catch_warnings():
        # Our own limit below is the one that counts; Pillow's warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(name, "not an image (or not a supported format)" + _hint(name)) from None
        except Image.DecompressionBombError:
            raise ImageError(name, f"more than {max_pixels} pixels (decompression bomb?)") from None
        except _DECODE_ERRORS as exc:
            raise ImageError(name, f"cannot decode ({exc})") from None
    width, height = im.size
    if width * height > max_pixels:
        raise ImageError(name, f"{width}x{height} is more than {max_pixels} pixels (decompression bomb?)")
    if width < 1 or height < 1:
        raise ImageError(name, f"image has no pixels ({width}x{height})")
    return im


def _load(im: Image.Image, name: str, max_pixels: int) -> Image.Transpose | None:
    """Decode the first frame of an animation; return the transposition its EXIF orientation asks for."""
    try:
        im.seek(0)
        im.load()
        return TRANSPOSE.get(im.getexif().get(ExifTags.Base.Orientation, 1))
    except _DECODE_ERRORS as exc:
        raise ImageError(name, f"cannot decode ({exc})") from None
    except Image.DecompressionBombError:
        raise ImageError(name, f"more than {max_pixels} pixels (decompression bomb?)") from None


def to_array(im: Image.Image, spec: InputSpec) -> np.ndarray:
    """A decoded (upright) image as a ``(S, S, C)`` uint8 array following the resize policy."""
    return prepared(im, spec.image_size, spec.channels, None, white_point(im), spec.fit).reshape(spec.shape)


def to_pil(image: np.ndarray) -> Image.Image:
    """The way back: an (S, S, 1) or (S, S) uint8 array as an "L" image, an (S, S, 3) one as "RGB"."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise InvalidArgumentError(
            f"an image array must be (S, S), (S, S, 1) or (S, S, 3) uint8, not {arr.dtype} {arr.shape}"
        )
    return Image.fromarray(arr)  # the mode follows from the shape: "L" or "RGB"


def decode_bytes_for(
    data: bytes, specs: list[InputSpec], name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[ImageMeta, list[np.ndarray]]:
    """Bytes of an image file decoded once -> its metadata and one ``(S, S, C)`` array per spec.

    Memory: the pixel limit is checked from the header before decoding; a JPEG is decoded at a
    reduced DCT scale, other formats at full size (Pillow cannot do less), and every conversion
    after that runs on the shrunk image (:mod:`embedsearch.data.resize`). Raises ImageError.
    """
    if not specs:
        raise InvalidArgumentError("decoding needs at least one input spec")
    im = _header(data, name, max_pixels)
    fmt, mode, (width, height) = (im.format or "unknown").upper(), im.mode, im.size
    drafted = draft(
        im, max(draft_size(im.size, s.image_size, s.fit) for s in specs), all(s.channels == 1 for s in specs)
    )
    turn = _load(im, name, max_pixels)
    if not drafted:
        width, height = im.size
    if turn in QUARTER_TURNS:
        width, height = height, width
    meta = ImageMeta(sha256(data), width, height, fmt, mode, len(data))
    try:
        white = white_point(im)
        views = [prepared(im, s.image_size, s.channels, turn, white, s.fit).reshape(s.shape) for s in specs]
        return meta, views
    except _DECODE_ERRORS as exc:
        raise ImageError(name, f"cannot convert ({exc})") from None


def decode_bytes(
    data: bytes, spec: InputSpec, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[ImageMeta, np.ndarray]:
    """Bytes of an image file -> its metadata and a ``(S, S, C)`` uint8 array. Raises ImageError."""
    meta, (pixels,) = decode_bytes_for(data, [spec], name, max_pixels)
    return meta, pixels


def decode_file(path: str, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[ImageMeta, np.ndarray]:
    return decode_bytes(read_bytes(path), spec, path, max_pixels)


def load_image(
    path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> Image.Image:
    """An image file decoded and oriented, in its own mode; with ``max_side``, shrunk as
    :func:`shrunk_image` does (grid tiles: a 12-megapixel JPEG is never decoded at full size)."""
    if max_side is not None:
        return shrunk_image(read_bytes(str(path)), max_side, str(path), max_pixels)
    im = _header(read_bytes(str(path)), str(path), max_pixels)
    turn = _load(im, str(path), max_pixels)
    return im if turn is None else im.transpose(turn)


def shrunk_image(
    data: bytes, max_side: int, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Bytes of an image file -> upright, in L (grey) or RGB on white, its longer side at most ``max_side``.

    The pixel limit and EXIF orientation apply as for decoding; a JPEG is decoded at a reduced DCT
    scale (:func:`~embedsearch.data.resize.draft`) and nothing is ever enlarged. Raises ImageError.
    """
    im = _header(data, name, max_pixels)
    # A picture to look at needs less headroom over its size than a model's input: the DCT scale
    # keeps 1.5 x max_side (a 12 MP photo to 256 px: 1/8, where 3 x would take 1/4 and 40 % longer).
    draft(im, max(1, max_side // 2), grey=False)
    turn = _load(im, name, max_pixels)
    try:
        channels = 1 if im.mode in _GREY_MODES and "transparency" not in im.info else 3
        return fitted(im, max_side, channels, turn, white_point(im))
    except _DECODE_ERRORS as exc:
        raise ImageError(name, f"cannot convert ({exc})") from None


def header_pixels(data: bytes) -> int:
    """Width x height from the header alone (0 if unreadable: decoding refuses such bytes at once)."""
    quick = _probe_png(data[:32])
    if quick is not None:
        return quick[0] * quick[1]
    _register_plugins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return int(im.width * im.height)
    except (UnidentifiedImageError, Image.DecompressionBombError, *_DECODE_ERRORS):
        return 0


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _probe_png(head: bytes) -> tuple[int, int, bool] | None:
    """Size and greyness straight from a PNG's IHDR (10x faster than Pillow); None if not that simple."""
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    colour_type = head[25]
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if colour_type not in (0, 2, 4, 6) or not width or not height:  # 3 = palette: Pillow must look
        return None
    return width, height, colour_type in (0, 4)


def probe(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, bool]:
    """(width, height, is_grey) from the header alone; raises ImageError like decoding would."""
    _regular(path)
    try:
        with open(path, "rb") as fh:
            quick = _probe_png(fh.read(32))
    except OSError:
        raise ImageError(path, "cannot read file") from None
    if quick is not None:
        return quick
    _register_plugins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                grey = im.mode in _GREY_MODES or (im.mode == "P" and _grey_palette(im))
                return im.width, im.height, grey
    except (UnidentifiedImageError, Image.DecompressionBombError, *_DECODE_ERRORS):
        raise ImageError(path, "not an image, or unreadable") from None


def _grey_palette(im: Image.Image) -> bool:
    pal = im.getpalette() or []
    rgb = np.asarray(pal[: len(pal) - len(pal) % 3], dtype=np.int16).reshape(-1, 3)
    return bool((rgb == rgb[:, :1]).all())


def infer_spec(paths: list[str], image_size: int | None = None, channels: int | None = None) -> InputSpec:
    """Most common longer side (capped at 64) and grey only if every image is grey (headers only, of at
    most INFER_SAMPLE files spread evenly over ``paths``)."""
    if image_size is not None and channels is not None:
        return InputSpec(image_size, channels)
    if not paths:
        raise DataError("no images to infer the input size and channels from")
    if len(paths) > INFER_SAMPLE:  # evenly spread over the folder: the headers of a million files take minutes
        paths = paths[:: -(-len(paths) // INFER_SAMPLE)]
    sizes: Counter[int] = Counter()
    all_grey = True
    for path in paths:
        try:
            width, height, grey = probe(path)
        except ImageError:
            continue
        if min(width, height) < 1:
            continue
        sizes[max(width, height)] += 1
        all_grey = all_grey and grey
    if not sizes:
        raise DataError("none of the files could be read as an image")
    size = image_size or min(sizes.most_common(1)[0][0], MAX_INFERRED_SIZE)
    return InputSpec(size, channels or (1 if all_grey else 3))
